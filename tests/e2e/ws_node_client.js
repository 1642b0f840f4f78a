// A WebSocket client (Node `ws`, Debian's node-ws) driven by the e2e tests:
// one JSON command per line on stdin, one JSON event per line on stdout.
// Run with NODE_PATH=/usr/share/nodejs.
//
// commands: {op:"open", id, url, protocols?, ca?}   every host name -> 127.0.0.1
//           {op:"send", id, b64, binary, fin?}      fin:false sends a fragment
//           {op:"ping", id, b64}
//           {op:"close", id, code, reason}
//           {op:"terminate", id}                    drops the TCP connection
//           {op:"pause", id} / {op:"resume", id}    stop / restart reading
// events:   {ev:"open", id, protocol, extensions}
//           {ev:"message", id, binary, b64}
//           {ev:"pong", id, b64}
//           {ev:"close", id, code, reason}
//           {ev:"refused", id, status, headers, body}   (unexpected-response)
//           {ev:"error", id, message}
'use strict';
const fs = require('fs');
const readline = require('readline');
const WebSocket = require('ws');

const socks = new Map();
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');

function loopback(hostname, options, cb) {
  if (typeof options === 'function') { cb = options; options = {}; }
  if (options && options.all) cb(null, [{ address: '127.0.0.1', family: 4 }]);
  else cb(null, '127.0.0.1', 4);
}

function open(c) {
  const opts = { lookup: loopback, maxPayload: 64 << 20 };
  if (c.ca) opts.ca = fs.readFileSync(c.ca);
  const ws = new WebSocket(c.url, c.protocols || [], opts);
  ws.binaryType = 'nodebuffer';
  socks.set(c.id, ws);
  ws.on('open', () => out({ ev: 'open', id: c.id, protocol: ws.protocol, extensions: ws.extensions }));
  ws.on('message', (data, isBinary) =>
    out({ ev: 'message', id: c.id, binary: isBinary, b64: Buffer.from(data).toString('base64') }));
  ws.on('pong', (data) => out({ ev: 'pong', id: c.id, b64: data.toString('base64') }));
  ws.on('close', (code, reason) => out({ ev: 'close', id: c.id, code, reason: reason.toString() }));
  ws.on('error', (e) => out({ ev: 'error', id: c.id, message: String(e && e.message) }));
  ws.on('unexpected-response', (req, res) => {
    const chunks = [];
    res.on('data', (d) => chunks.push(d));
    res.on('end', () => {
      out({ ev: 'refused', id: c.id, status: res.statusCode, headers: res.headers,
            body: Buffer.concat(chunks).toString('base64') });
      req.destroy();
    });
  });
}

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on('line', (line) => {
  let c;
  try { c = JSON.parse(line); } catch (e) { out({ ev: 'error', id: null, message: 'bad command' }); return; }
  try {
    const ws = socks.get(c.id);
    switch (c.op) {
      case 'open': open(c); break;
      case 'send': {
        const data = Buffer.from(c.b64, 'base64');
        ws.send(c.binary ? data : data.toString('utf8'), { binary: !!c.binary, fin: c.fin !== false });
        break;
      }
      case 'ping': ws.ping(Buffer.from(c.b64 || '', 'base64')); break;
      case 'close': ws.close(c.code, c.reason); break;
      case 'terminate': ws.terminate(); break;
      case 'pause': ws.pause(); break;
      case 'resume': ws.resume(); break;
      default: out({ ev: 'error', id: c.id, message: 'unknown op ' + c.op });
    }
  } catch (e) {
    out({ ev: 'error', id: c.id, message: 'op ' + c.op + ': ' + String(e && e.message) });
  }
});
rl.on('close', () => process.exit(0));
out({ ev: 'ready', id: null });

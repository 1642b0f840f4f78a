"""The several-node deployment files: deploy/compose (three gateways, Redis,
HAProxy) and deploy/k8s (a Deployment of three, Redis, Service, PDB,
NetworkPolicy). No Docker engine or Kubernetes runs here, so each file is
checked two ways:

* by docker compose's own parser: Debian's docker-compose 1.29, whose
  `config` needs no engine, accepts compose.yaml and refuses a broken copy
  (kubeconform is not in Debian: the manifests get the checks below);
* statically: the files agree with each other (addresses, ports, names,
  labels, selectors, secrets and the paths they are mounted at, grace
  periods against the drain timeout), and every TUNNEL_GATEWAY_* variable
  and command-line flag they set passes the gateway's --check-config;
* by running what they describe on loopback: redis-server with the compose
  file's arguments, three tunnel-gateway processes with exactly its
  environment and commands (addresses and file paths moved to scratch
  places), and Debian's HAProxy with deploy/compose/haproxy.cfg itself
  (only its addresses rewritten): PROXY v2, TLS health checks with SNI,
  forwarding between the nodes, the containers' own health checks, and a
  SIGTERM'd node drained without a failed request. For k8s, a gateway
  started with the Deployment's environment answers the kubelet's probe as
  the manifest expects."""

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import yaml

from cluster_env import connects, redis_ping
from test_deploy import check_config, clean_env, docker_excluded, dockerignore_rx, need, sh
from local_api import LocalApi
from tunnel_env import REPO, TIME_SCALE, Agent, Proc, reserve_port, wait_for


COMPOSE_DIR = REPO / "deploy" / "compose"
K8S_DIR = REPO / "deploy" / "k8s"
FILE_VARS = ("TUNNEL_GATEWAY_CERT", "TUNNEL_GATEWAY_KEY", "TUNNEL_GATEWAY_ALLOW",
             "TUNNEL_GATEWAY_CLUSTER_SECRET_FILE")


# ---- helpers ---------------------------------------------------------------------------

def compose(tg_domain=None):
    """compose.yaml as docker compose reads it: ${VAR:-default} interpolated
    from {"TG_DOMAIN": tg_domain} ("$$" is a literal "$")."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        val = {"TG_DOMAIN": tg_domain}.get(m.group(1))
        assert val is not None or m.group(2) is not None, f"${{{m.group(1)}}} has no default"
        return val if val else m.group(2)
    text = re.sub(r"\$\$|\$\{(\w+)(?::-([^}]*))?\}", sub,
                  (COMPOSE_DIR / "compose.yaml").read_text())
    return yaml.safe_load(text)


def gateways(c):
    return {k: v for k, v in c["services"].items() if k.startswith("gateway")}


def k8s_docs():
    kust = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    docs = []
    for res in kust["resources"]:
        assert (K8S_DIR / res).is_file(), f"kustomization.yaml names a missing {res}"
        docs += [(res, d) for d in yaml.safe_load_all((K8S_DIR / res).read_text()) if d]
    return docs


def by_kind(docs, kind, name=None):
    hits = [d for _, d in docs if d["kind"] == kind and (name is None or
                                                        d["metadata"]["name"] == name)]
    assert hits, f"no {kind} {name or ''} in deploy/k8s"
    return hits


def seconds(v):
    m = re.fullmatch(r"(\d+)(s|m)?", str(v))
    assert m, v
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def make_cert(tmp, domain, hosts=()):
    """A self-signed certificate for domain, *.domain and hosts: (cert, key).
    (OpenSSL matches no wildcard over a one-label suffix such as *.localhost,
    so the hosts a test reaches are named too.)"""
    need("openssl", "openssl")
    key, crt = tmp / "privkey.pem", tmp / "fullchain.pem"
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
       "-nodes", "-keyout", key, "-out", crt, "-days", "2", "-subj", f"/CN={domain}",
       "-addext", f"subjectAltName=DNS:{domain},DNS:*.{domain}" +
       "".join(f",DNS:{h}" for h in hosts), check=True)
    return crt, key


def scratch_files(tmp, addrs=(), domain="localhost"):
    """The files the deploy files mount, in tmp: {variable: path}; addrs are
    allowed to register and named in the certificate."""
    tmp.mkdir(parents=True, exist_ok=True)
    crt, key = make_cert(tmp, domain, [f"{a}.{domain}" for a in addrs])
    allow = tmp / "allow.txt"
    allow.write_text((COMPOSE_DIR / "allow.txt").read_text() + "".join(a + "\n" for a in addrs))
    secret = tmp / "cluster.secret"
    secret.write_bytes(os.urandom(48).hex().encode())
    os.chmod(secret, 0o400)
    return {"TUNNEL_GATEWAY_CERT": crt, "TUNNEL_GATEWAY_KEY": key,
            "TUNNEL_GATEWAY_ALLOW": allow, "TUNNEL_GATEWAY_CLUSTER_SECRET_FILE": secret}


def hap_stat(sock_path):
    """{server: status} of HAProxy's backend "gateways", from its stats socket."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(sock_path))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return {}
    rows = [r.split(",") for r in data.decode().splitlines() if r and not r.startswith("#")]
    return {r[1]: r[17] for r in rows if r[0] == "gateways" and r[1] not in
            ("FRONTEND", "BACKEND")}


# ---- compose: static -------------------------------------------------------------------

def test_compose_file_agrees_with_itself_and_haproxy_cfg():
    c = compose()
    gws = gateways(c)
    assert sorted(gws) == ["gateway1", "gateway2", "gateway3"]
    assert {"redis", "haproxy"} <= set(c["services"])
    nets = c["networks"]
    assert nets["cluster"].get("internal") is True, "Redis and the node listeners stay internal"
    hap = (COMPOSE_DIR / "haproxy.cfg").read_text()
    servers = dict(re.findall(r"^\s*server (\S+) (\S+)", hap, re.M))
    assert sorted(servers) == sorted(gws)
    assert re.search(r"^\s*default-server .*\bsend-proxy-v2\b", hap, re.M)
    assert re.search(r"^\s*default-server .*\bcheck-ssl\b.*\bcheck-sni\b", hap, re.M)
    bind = re.search(r"^\s*bind :(\d+)$", hap, re.M).group(1)
    assert c["services"]["haproxy"]["ports"] == [f"443:{bind}"]
    for name, svc in gws.items():
        env = svc["environment"]
        assert env["TUNNEL_GATEWAY_PROXY_PROTOCOL"] == "true"   # HAProxy sends v2 headers
        assert (COMPOSE_DIR / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        cmd = svc["command"]
        listen = cmd[cmd.index("--node-listen") + 1]
        advertise = cmd[cmd.index("--node-advertise") + 1]
        assert cmd[cmd.index("--node-id") + 1] == name
        ip, port = listen.rsplit(":", 1)
        assert advertise == listen and env["TG_NODE_IP"] == ip
        assert svc["networks"]["cluster"]["ipv4_address"] == ip
        assert port in svc["healthcheck"]["test"][-1]
        # HAProxy dials each gateway's front address on its main port
        front = svc["networks"]["front"]["ipv4_address"]
        assert servers[name] == f"{front}:{env['TUNNEL_GATEWAY_LISTEN'].rsplit(':', 1)[1]}"
        for net, want in (("front", front), ("cluster", ip)):
            subnet = nets[net]["ipam"]["config"][0]["subnet"]
            assert want.startswith(subnet.rsplit(".", 1)[0] + "."), (name, net, want, subnet)
        # docker compose stop waits stop_grace_period, then SIGKILL: above the drain
        assert seconds(svc["stop_grace_period"]) > seconds(env["TUNNEL_GATEWAY_DRAIN_TIMEOUT"])
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["secrets"] == ["cluster_secret"]
        assert env["TUNNEL_GATEWAY_CLUSTER_SECRET_FILE"] == "/run/secrets/cluster_secret"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        for var in ("TUNNEL_GATEWAY_CERT", "TUNNEL_GATEWAY_KEY", "TUNNEL_GATEWAY_ALLOW"):
            path = env[var]
            assert any(path == m or path.startswith(m + "/") for m in mounts), (var, path)
    m = re.match(r"redis://([^:/]+):(\d+)$", gws["gateway1"]["environment"]["TUNNEL_GATEWAY_REDIS"])
    assert m and m.group(1) == "redis" and "cluster" in c["services"]["redis"]["networks"]
    assert (COMPOSE_DIR / "allow.txt").is_file()
    assert c["secrets"]["cluster_secret"]["file"] == "./secrets/cluster.secret"


def test_compose_gateway_settings_pass_check_config(bin_path, tmp_path):
    files = scratch_files(tmp_path)
    for name, svc in gateways(compose()).items():
        env = {k: str(v) for k, v in svc["environment"].items()}
        env.update({k: str(v) for k, v in files.items()})
        env["TUNNEL_GATEWAY_STATE_DIR"] = str(tmp_path / f"{name}-state")
        r = check_config(bin_path, *svc["command"], env=env)
        assert r.returncode == 0, f"{name}: {r.stderr}"
        assert "warning" not in r.stderr, r.stderr
        for k in env:
            if k.startswith("TUNNEL_GATEWAY_"):
                key = k[len("TUNNEL_GATEWAY_"):].lower().replace("_", "-")
                assert re.search(rf"^{key} = .*# env {k}", r.stdout, re.M), (k, r.stdout)


def test_docker_compose_config_accepts_the_file(tmp_path):
    """docker compose's own parser (Debian's docker-compose; it needs no
    engine for `config`) accepts compose.yaml, resolves it as this file's
    reading does, and refuses a broken copy."""
    need("docker-compose", "docker-compose")
    env = clean_env(TG_DOMAIN="example.com")
    r = sh("docker-compose", "-f", COMPOSE_DIR / "compose.yaml", "config", env=env,
           cwd=COMPOSE_DIR)
    assert r.returncode == 0, r.stderr
    theirs = yaml.safe_load(r.stdout)
    mine = compose("example.com")
    for name in gateways(mine):
        env_t = {k: str(v) for k, v in theirs["services"][name]["environment"].items()}
        env_m = {k: str(v) for k, v in mine["services"][name]["environment"].items()}
        assert env_t == env_m, name
        assert theirs["services"][name]["command"] == mine["services"][name]["command"]
    assert env_t["TUNNEL_GATEWAY_PUBLIC_URL_BASE"] == "https://example.com"
    broken = tmp_path / "compose.yaml"
    broken.write_text((COMPOSE_DIR / "compose.yaml").read_text().replace(
        "stop_grace_period: 330s", "stop_grace_period: [330]"))
    r = sh("docker-compose", "-f", broken, "config", "-q", env=env, cwd=COMPOSE_DIR)
    assert r.returncode != 0, "a broken copy passed docker-compose config"


def test_compose_keys_and_secret_stay_out_of_git_and_the_build_context():
    """README's steps put the certificate, its key and the cluster secret in
    deploy/compose/{tls,secrets}: neither git nor docker build may take them."""
    rxs = dockerignore_rx()
    for rel in ("deploy/compose/tls/privkey.pem", "deploy/compose/secrets/cluster.secret"):
        assert docker_excluded(rel, rxs), rel
        r = sh("git", "-C", REPO, "check-ignore", "-q", "--no-index", rel)
        assert r.returncode == 0, f"{rel} is not ignored by git"
    assert not docker_excluded("deploy/compose/compose.yaml", rxs)


def test_haproxy_cfg_is_valid():
    need("haproxy", "haproxy")
    r = sh("haproxy", "-c", "-f", COMPOSE_DIR / "haproxy.cfg",
           env=clean_env(TG_DOMAIN="example.com"))
    assert r.returncode == 0, r.stdout + r.stderr


# ---- compose: run on loopback ----------------------------------------------------------

class Topology:
    """compose.yaml's services as processes on loopback."""

    def __init__(self, build_dir, tmp, addrs):
        self.tmp = tmp
        self.procs = []
        c = compose("localhost")
        self.files = scratch_files(tmp / "files", addrs)
        # redis: the compose file's command, on a loopback port
        self.redis_port = reserve_port()
        rcmd = c["services"]["redis"]["command"]
        assert rcmd[0] == "redis-server"
        (tmp / "redis").mkdir()
        self.redis = self.spawn(["redis-server", *rcmd[1:], "--port", str(self.redis_port),
                                 "--bind", "127.0.0.1", "--dir", tmp / "redis"], "redis")
        wait_for(lambda: redis_ping(self.redis_port), 10, "redis-server answering")
        self.front, self.monitor = reserve_port(), reserve_port()
        self.nodes = {}
        for name, svc in gateways(c).items():
            self.nodes[name] = self.start_node(build_dir, name, svc)
        # HAProxy: haproxy.cfg itself, addresses moved to loopback, a stats socket added
        self.stats = tmp / "haproxy.sock"
        cfg = (COMPOSE_DIR / "haproxy.cfg").read_text()
        cfg = re.sub(r"^(\s*)bind :8443$", rf"\1bind 127.0.0.1:{self.front}", cfg, flags=re.M)
        cfg = cfg.replace("bind 127.0.0.1:8404", f"bind 127.0.0.1:{self.monitor}")
        cfg = cfg.replace("global\n", f"global\n    stats socket {self.stats} level admin\n", 1)
        for name, n in self.nodes.items():
            front = c["services"][name]["networks"]["front"]["ipv4_address"]
            cfg, k = re.subn(rf"\b{re.escape(front)}:8443\b", f"127.0.0.1:{n['port']}", cfg)
            assert k == 1, (name, front)
        (tmp / "haproxy.cfg").write_text(cfg)
        self.hap = self.spawn(["haproxy", "-db", "-f", tmp / "haproxy.cfg"], "haproxy",
                              env=clean_env(TG_DOMAIN="localhost"))
        wait_for(lambda: connects(self.front), 10, "haproxy listening")

    def spawn(self, argv, name, env=None):
        p = Proc([str(a) for a in argv], self.tmp / f"{name}.log", env=env)
        self.procs.append(p)
        return p

    def start_node(self, build_dir, name, svc):
        port, node_port = reserve_port(), reserve_port()
        env = {k: str(v) for k, v in svc["environment"].items()}
        listen_ip = env["TG_NODE_IP"]
        env.update({k: str(v) for k, v in self.files.items()})
        env["TUNNEL_GATEWAY_LISTEN"] = f"127.0.0.1:{port}"
        env["TUNNEL_GATEWAY_REDIS"] = f"redis://127.0.0.1:{self.redis_port}"
        env["TUNNEL_GATEWAY_STATE_DIR"] = str(self.tmp / f"{name}-state")
        env["TG_NODE_IP"] = "127.0.0.1"
        assert env["TUNNEL_GATEWAY_PUBLIC_URL_BASE"] == "https://localhost"
        env["TUNNEL_GATEWAY_PUBLIC_URL_BASE"] = f"https://localhost:{self.front}"
        cmd = [a.replace(f"{listen_ip}:9443", f"127.0.0.1:{node_port}") for a in svc["command"]]
        p = self.spawn([Path(build_dir) / "gateway/tunnel-gateway", *cmd, "--log-level", "debug",
                        "--ping-interval", "1"], name, env=clean_env(**env))
        p.wait_log(r"event=listening addr=\S+ port=\d+ scheme=h2c", timeout=15)
        # the container's health check, as compose runs it ($$ is compose's escape for $)
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "bash", "-c"]
        script = test[3].replace("127.0.0.1/8443", f"127.0.0.1/{port}") \
                        .replace("/9443", f"/{node_port}")
        return {"proc": p, "port": port, "node_port": node_port, "health": script,
                "env": env}

    def healthcheck(self, name):
        n = self.nodes[name]
        return subprocess.run(["bash", "-c", n["health"]], env=clean_env(**n["env"]),
                              timeout=10, capture_output=True).returncode

    def redis_cmd(self, *args):
        return subprocess.run(["redis-cli", "-p", str(self.redis_port), *map(str, args)],
                              capture_output=True, text=True, timeout=10).stdout.strip()

    def stop(self):
        for p in reversed(self.procs):
            p.stop()


def front_curl(topo, url_path, addr, src="127.0.0.5"):
    r = subprocess.run(["curl", "-sS", "--interface", src, "--cacert",
                        str(topo.files["TUNNEL_GATEWAY_CERT"]), "--max-time", "20",
                        "--connect-to", f"::127.0.0.1:{topo.front}", "-w", "\n%{http_code}",
                        f"https://{addr}.localhost:{topo.front}{url_path}"],
                       capture_output=True, timeout=30)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code or 0), body, r.stderr.decode(errors="replace")


def test_compose_topology_runs_on_loopback(build_dir, tmp_path):
    for tool, pkg in (("haproxy", "haproxy"), ("redis-server", "redis-server"),
                      ("redis-cli", "redis-tools")):
        need(tool, pkg)
    api = LocalApi()
    topo = None
    agent = Agent(build_dir, tmp_path)
    try:
        addr = agent.new("api", api.url)
        agent.cli("set", "api", "--max-inflight", "1000")
        # the allow list: compose's file plus this agent
        topo = Topology(build_dir, tmp_path, [addr])
        # every container health check passes; HAProxy's TLS /health checks
        # (with PROXY v2 headers and SNI) bring every server up
        assert [topo.healthcheck(n) for n in topo.nodes] == [0, 0, 0]
        wait_for(lambda: set(hap_stat(topo.stats).values()) == {"UP"} and
                 len(hap_stat(topo.stats)) == 3, 20 * TIME_SCALE, "every server UP in HAProxy")
        # without a PROXY v2 header a gateway's listener refuses the connection
        n1 = topo.nodes["gateway1"]
        r = subprocess.run(["curl", "-sS", "-k", "--max-time", "5",
                            f"https://127.0.0.1:{n1['port']}/health"], capture_output=True)
        assert r.returncode != 0

        # the agent's tunnel comes in through HAProxy, as clients do
        front = type("F", (), {"scheme": "https", "domain": "localhost", "port": topo.front,
                               "ca": topo.files["TUNNEL_GATEWAY_CERT"]})
        agent.run(front)
        st = agent.wait_connected(timeout=30)
        # the URL handed out is the front's (PUBLIC_URL_BASE), not a node's port
        assert st["agents"][0]["url"] == f"https://{addr}.localhost:{topo.front}", st
        owner = wait_for(lambda: topo.redis_cmd("GET", f"agent:{addr}").split("|")[2:3], 10,
                         "the agent's claim in Redis")[0]
        assert owner in topo.nodes
        # leastconn sends these to the nodes without the tunnel: forwarded to the owner
        served = set()
        for i in range(24):
            st, body, err = front_curl(topo, f"/echo/{i}", addr)
            assert st == 200, (i, st, body[:200], err)
            h = json.loads(body)["headers"]
            assert h["x-forwarded-for"] == ["127.0.0.5"], h   # from the PROXY v2 header
        for name, n in topo.nodes.items():
            if re.search(r"event=request .*status=200", n["proc"].text()):
                served.add(name)
        assert len(served) >= 2 and served - {owner}, (served, owner)

        # SIGTERM the owner (docker compose stop): HAProxy sees 503 on /health,
        # the agent moves, and no request through the front fails meanwhile
        old = topo.nodes[owner]
        os.kill(old["proc"].p.pid, signal.SIGTERM)
        old["proc"].wait_log(r"event=drain_start", timeout=10)
        t0, bad, n_req, moved = time.monotonic(), [], 0, None
        while time.monotonic() - t0 < 30 * TIME_SCALE:
            st, body, err = front_curl(topo, f"/echo/d{n_req}", addr)
            n_req += 1
            if st != 200:
                bad.append((st, body[:200], err))
            cur = topo.redis_cmd("GET", f"agent:{addr}").split("|")[2:3]
            if moved is None and cur and cur[0] != owner:
                moved = time.monotonic() - t0
            if moved is not None and hap_stat(topo.stats).get(owner) not in (None, "UP") and \
                    time.monotonic() - t0 > moved + 1:
                break
        assert not bad, bad
        assert moved is not None, "the agent never moved to another node"
        assert hap_stat(topo.stats)[owner] != "UP"
        assert old["proc"].p.wait(60 * TIME_SCALE) == 0
        print(f"compose on loopback: served by {sorted(served)}, owner {owner}; "
              f"moved {moved:.2f} s after SIGTERM, {n_req} requests during the drain, none failed")
    finally:
        agent.stop()
        if topo is not None:
            topo.stop()
        api.stop()


# ---- k8s -------------------------------------------------------------------------------

def gateway_pod(docs):
    dep = by_kind(docs, "Deployment", "tunnel-gateway")[0]
    return dep, dep["spec"]["template"]["spec"]


def k8s_env(container, files, pod_name="tunnel-gateway-7d9f-x2x", pod_ip="127.0.0.1"):
    """The container's env as the kubelet makes it: fieldRefs filled in,
    $(VAR) expanded from earlier entries; the mounted files moved to files."""
    env = {}
    for e in container["env"]:
        if "valueFrom" in e:
            ref = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = {"metadata.name": pod_name, "status.podIP": pod_ip}[ref]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], str(e["value"]))
    env.update({k: str(v) for k, v in files.items() if k in env})
    return env


def test_k8s_manifests_agree_with_each_other():
    docs = k8s_docs()
    for res, d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), res
    dep, pod = gateway_pod(docs)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    sel = dep["spec"]["selector"]["matchLabels"]
    assert sel.items() <= labels.items()
    (ctr,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    assert ports["https"] == int(env["TUNNEL_GATEWAY_LISTEN"].rsplit(":", 1)[1])
    assert ports["node"] == int(env["TUNNEL_GATEWAY_NODE_LISTEN"].rsplit(":", 1)[1])
    assert env["TUNNEL_GATEWAY_NODE_ADVERTISE"].endswith(f":{ports['node']}")
    for probe in ("readinessProbe", "livenessProbe"):
        g = ctr[probe]["httpGet"]
        assert g["path"] == "/health" and g["port"] in ports and g["scheme"] == "HTTPS"
    # Service, PDB and the NetworkPolicy select the gateway pods
    svc = by_kind(docs, "Service", "tunnel-gateway")[0]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
    pdb = by_kind(docs, "PodDisruptionBudget")[0]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    np_gw, np_redis = (by_kind(docs, "NetworkPolicy", n)[0]
                       for n in ("tunnel-gateway", "tunnel-gateway-redis"))
    assert np_gw["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    np_ports = {p["port"] for rule in np_gw["spec"]["ingress"] for p in rule["ports"]}
    assert np_ports == set(ports.values())
    node_rule = next(r for r in np_gw["spec"]["ingress"]
                     if any(p["port"] == ports["node"] for p in r["ports"]))
    assert node_rule["from"][0]["podSelector"]["matchLabels"].items() <= labels.items()
    # Redis: the URL's host and port are the Service's, which selects the StatefulSet
    m = re.match(r"redis://([^:/]+):(\d+)$", env["TUNNEL_GATEWAY_REDIS"])
    rsvc = by_kind(docs, "Service", m.group(1))[0]
    assert int(m.group(2)) in [p["port"] for p in rsvc["spec"]["ports"]]
    sts = by_kind(docs, "StatefulSet", "tunnel-gateway-redis")[0]
    rlabels = sts["spec"]["template"]["metadata"]["labels"]
    assert rsvc["spec"]["selector"].items() <= rlabels.items()
    assert np_redis["spec"]["podSelector"]["matchLabels"].items() <= rlabels.items()
    assert not rlabels.items() <= labels.items() and not labels.items() <= rlabels.items()
    rports = {p["name"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert all(p["targetPort"] in rports for p in rsvc["spec"]["ports"])
    # the grace period covers preStop and the drain
    pre = ctr["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre[1]) + int(env["TUNNEL_GATEWAY_DRAIN_TIMEOUT"])
    # the rollout brings a new pod up before an old one drains
    ru = dep["spec"]["strategy"]["rollingUpdate"]
    assert ru["maxUnavailable"] == 0 and ru["maxSurge"] >= 1
    # every file the gateway reads lies in a mounted volume that provides it
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
    assert set(mounts.values()) <= set(vols)
    secrets = {d["metadata"]["name"]: set(d["stringData"]) for d in
               yaml.safe_load_all((K8S_DIR / "secrets.example.yaml").read_text()) if d}
    maps = {d["metadata"]["name"]: set(d["data"]) for _, d in docs if d["kind"] == "ConfigMap"}
    init = pod["initContainers"][0]
    installed = init["command"][-1]
    for var in FILE_VARS:
        path = env[var]
        mdir, fname = path.rsplit("/", 1)
        vol = vols[mounts[mdir]]
        if "secret" in vol:
            assert fname in secrets[vol["secret"]["secretName"]], (var, path)
        elif "configMap" in vol:
            assert fname in maps[vol["configMap"]["name"]], (var, path)
        else:
            # the cluster secret: copied by the init container into the emptyDir
            assert "emptyDir" in vol and path == installed, (var, path)
            src_dir, src = init["command"][-2].rsplit("/", 1)
            imount = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
            assert src in secrets[vols[imount[src_dir]]["secret"]["secretName"]]
            assert imount[mdir] == mounts[mdir]
    assert pod["securityContext"]["runAsUser"] == 10001       # the image's user
    assert "USER 10001:10001" in (REPO / "deploy" / "Dockerfile").read_text()
    assert pod.get("enableServiceLinks") is False


def test_k8s_service_links_would_break_the_gateway(bin_path, tmp_path):
    """Why deployment.yaml turns service links off: the variable they would
    set for the Service "tunnel-gateway" is refused as --port."""
    r = check_config(bin_path, "--state-dir", tmp_path / "s",
                     env={"TUNNEL_GATEWAY_PORT": "tcp://10.0.0.7:443"})
    assert r.returncode != 0 and "TUNNEL_GATEWAY_PORT" in r.stderr, r.stderr


def test_k8s_gateway_env_runs_and_answers_the_kubelet_probe(bin_path, tmp_path):
    need("redis-server", "redis-server")
    docs = k8s_docs()
    _, pod = gateway_pod(docs)
    ctr = pod["containers"][0]
    files = scratch_files(tmp_path / "files", domain="example.com")
    # the init container's copy of the cluster secret, as it makes it
    src = tmp_path / "cluster-src"
    src.write_bytes(os.urandom(48))
    init_cmd = pod["initContainers"][0]["command"]
    installed = tmp_path / "run" / "cluster.secret"
    installed.parent.mkdir()
    assert init_cmd[:3] == ["install", "-m", "0400"]
    sh("install", *init_cmd[1:3], src, installed, check=True)
    files["TUNNEL_GATEWAY_CLUSTER_SECRET_FILE"] = installed
    env = k8s_env(ctr, files)
    r = check_config(bin_path, env=env | {"TUNNEL_GATEWAY_STATE_DIR": str(tmp_path / "s")})
    assert r.returncode == 0, r.stderr
    assert re.search(r"^node-id = \"tunnel-gateway-7d9f-x2x\"\s+# env", r.stdout, re.M), r.stdout
    assert re.search(r"^node-advertise = \"127\.0\.0\.1:9443\"\s", r.stdout, re.M), r.stdout

    redis_port, port, node_port = reserve_port(), reserve_port(), reserve_port()
    redis = Proc(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                  "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                 tmp_path / "redis.log")
    gw = None
    try:
        wait_for(lambda: redis_ping(redis_port), 10, "redis-server answering")
        env.update({"TUNNEL_GATEWAY_LISTEN": f"127.0.0.1:{port}",
                    "TUNNEL_GATEWAY_NODE_LISTEN": f"127.0.0.1:{node_port}",
                    "TUNNEL_GATEWAY_NODE_ADVERTISE": f"127.0.0.1:{node_port}",
                    "TUNNEL_GATEWAY_REDIS": f"redis://127.0.0.1:{redis_port}",
                    "TUNNEL_GATEWAY_STATE_DIR": str(tmp_path / "state")})
        gw = Proc([str(bin_path("tunnel-gateway"))], tmp_path / "gw.log", env=clean_env(**env))
        # log lines are JSON, as TUNNEL_GATEWAY_LOG_FORMAT asks
        gw.wait_log(r'\{.*"event":"listening".*"scheme":"h2c"', timeout=15)
        assert "tls_cert_name_mismatch" not in gw.text()
        # the kubelet's HTTPS probe: no SNI, Host the pod IP and port, no
        # certificate check; it needs a 2xx or 3xx
        probe = ctr["readinessProbe"]["httpGet"]
        r = subprocess.run(["curl", "-sS", "-k", "--max-time", "5", "-o", "/dev/stderr",
                            "-w", "%{http_code}", f"https://127.0.0.1:{port}{probe['path']}"],
                           capture_output=True, text=True)
        assert r.stdout == "200", (r.stdout, r.stderr)
        health = json.loads(r.stderr)
        assert health.get("redis") == "ok" and health.get("node_id", health.get("machine")) == \
            "tunnel-gateway-7d9f-x2x", health
        assert all(json.loads(line) for line in gw.text().splitlines())
        assert gw.stop() == 0
        gw = None
    finally:
        if gw is not None:
            gw.stop()
        redis.stop()

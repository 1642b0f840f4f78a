/* libFuzzer target for gateway/gw_rds: the "tg:claims" messages and claim
 * values other nodes write to Redis (which a node must survive whatever they
 * hold: another version, a corrupted key, a hostile writer with Redis
 * access). The input is one message; a parsed claim is written back the way
 * gw_rds writes its own and must parse to the same fields, and its fields
 * must keep their bounds. */
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "gw_rds.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t addr[ID_ADDR_LEN];
    struct gw_rds_claim c, again;
    const char *value = NULL;
    char buf[512];
    int kind, n;

    kind = gw_rds_msg_parse((const char *)data, size, addr, &c, &value);
    assert(kind >= -1 && kind <= 1);
    if (kind != 0) {
        /* the value alone, as a GET reply would give it */
        if (gw_rds_claim_parse((const char *)data, size, &c) != 0)
            return 0;
    }
    assert(strlen(c.node) >= 1 && strlen(c.node) <= GW_NODE_ID_MAX);
    assert(strlen(c.adv) >= 1 && strlen(c.adv) <= GW_NODE_ADDR_MAX);
    assert(strlen(c.inst) <= TUN_INSTANCE_MAX);
    n = snprintf(buf, sizeof(buf), "v1|%llu|%s|%s|%s", (unsigned long long)c.ms, c.node, c.adv,
                 c.inst);
    assert(n > 0 && (size_t)n < sizeof(buf));
    assert(gw_rds_claim_parse(buf, (size_t)n, &again) == 0);
    assert(again.ms == c.ms && strcmp(again.node, c.node) == 0 &&
           strcmp(again.adv, c.adv) == 0 && strcmp(again.inst, c.inst) == 0);
    return 0;
}

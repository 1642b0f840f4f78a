/* tunnel-gateway: the command line, then one context (gw_ctx.c) runs. */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include <http_parser.h>

#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "log.h"
#include "tg_config.h"
#include "util.h"

int main(int argc, char **argv)
{
    struct gw_cfg cfg;
    struct gw_ctx *ctx;
    char err[1024];
    int rc;

    util_malloc_tune();
    if (gw_cfg_load(&cfg, argc, argv, err, sizeof(err)) != 0) {
        fprintf(stderr, "tunnel-gateway: %s\n(see tunnel-gateway --help)\n", err);
        gw_cfg_cleanup(&cfg);
        return 2;
    }
    if (cfg.show_help || cfg.show_version) {
        if (cfg.show_help)
            gw_cfg_print_help(stdout);
        else
            printf("tunnel-gateway %s\n", TG_VERSION);
        gw_cfg_cleanup(&cfg);
        return 0;
    }
    if (cfg.redis.text != NULL) {
        fprintf(stderr, "tunnel-gateway: --redis %s: the shared Redis registry is not "
                        "implemented in this version; unset --redis (or "
                        "TUNNEL_GATEWAY_REDIS, or redis in the config file) to run this node "
                        "with its registry in memory\n",
                cfg.redis.text);
        gw_cfg_cleanup(&cfg);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    /* http-parser's cap is process-wide; we count header bytes ourselves for
     * the 431 answer, so the parser only needs room above our limit */
    http_parser_set_max_header_size(cfg.max_header_bytes == 0 || cfg.max_header_bytes > 0x7fffffff
                                        ? 0x7fffffffu
                                        : (uint32_t)cfg.max_header_bytes + 16384u);
    ctx = gw_ctx_new(&cfg, &clk_system, err, sizeof(err));
    if (ctx == NULL) {
        fprintf(stderr, "tunnel-gateway: %s\n", err);
        gw_cfg_cleanup(&cfg);
        return 1;
    }
    rc = gw_ctx_run(ctx);
    LOG_INFO(ctx->log, "exit", LOG_I("code", rc));
    gw_ctx_free(ctx);
    gw_cfg_cleanup(&cfg);
    return rc;
}

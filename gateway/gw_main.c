/* tunnel-gateway: the command line, then one context (gw_ctx.c) runs.
 * Exit status: 0 success (also --help, --version, a good --check-config),
 * 1 runtime failure, 2 bad configuration. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clk.h"
#include "gw.h"
#include "gw_cfg.h"
#include "log.h"
#include "tg_config.h"
#include "tg_version.h"
#include "util.h"

static void print_version(void)
{
    /* TG_REVISION is `git describe` at build time, or the project version
     * outside a git checkout */
    if (strcmp(TG_REVISION, TG_VERSION) == 0)
        printf("tunnel-gateway %s\n", TG_VERSION);
    else
        printf("tunnel-gateway %s (git %s)\n", TG_VERSION, TG_REVISION);
}

int main(int argc, char **argv)
{
    struct gw_cfg *cfg = calloc(1, sizeof(*cfg));
    struct gw_ctx *ctx;
    char err[1024];
    int rc;

    util_malloc_tune();
    if (cfg == NULL) {
        fprintf(stderr, "tunnel-gateway: out of memory\n");
        return 1;
    }
    if (gw_cfg_load(cfg, argc, argv, err, sizeof(err)) != 0) {
        fprintf(stderr, "tunnel-gateway: %s\n(see tunnel-gateway --help)\n", err);
        gw_cfg_cleanup(cfg);
        free(cfg);
        return 2;
    }
    if (cfg->show_help || cfg->show_version || cfg->check_config) {
        if (cfg->show_help)
            gw_cfg_print_help(stdout);
        else if (cfg->show_version)
            print_version();
        else
            gw_cfg_print_effective(cfg, stdout);
        for (size_t i = 0; cfg->check_config && i < cfg->n_warnings; i++)
            fprintf(stderr, "tunnel-gateway: warning: %s\n", cfg->warnings[i]);
        gw_cfg_cleanup(cfg);
        free(cfg);
        return 0;
    }
    signal(SIGPIPE, SIG_IGN);
    ctx = gw_ctx_new(cfg, &clk_system, err, sizeof(err)); /* owns cfg from here */
    if (ctx == NULL) {
        fprintf(stderr, "tunnel-gateway: %s\n", err);
        return 1;
    }
    rc = gw_ctx_run(ctx);
    LOG_INFO(ctx->log, "exit", LOG_I("code", rc));
    gw_ctx_free(ctx);
    return rc;
}

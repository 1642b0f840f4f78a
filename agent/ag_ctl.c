/* Control-socket client, placeholder (ag_ctl.h): until the daemon has a
 * control socket, no daemon is ever found, status shows the saved settings
 * with state "disconnected", and notify does nothing. */
#include "ag_ctl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

static int status_json(struct ag_store *st, const struct ag_gateway *gw)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *arr = root != NULL ? cJSON_AddArrayToObject(root, "agents") : NULL;
    char url[512];
    char *text;

    if (arr == NULL)
        goto fail_root;
    for (size_t i = 0; i < ag_store_count(st); i++) {
        const struct ag_agent *a = ag_store_agent(st, i);
        cJSON *o = cJSON_CreateObject();
        if (o == NULL || !cJSON_AddItemToArray(arr, o)) {
            cJSON_Delete(o);
            goto fail_root;
        }
        if (ag_store_public_url(gw, a->address, url, sizeof(url)) != 0)
            url[0] = '\0';
        if (cJSON_AddStringToObject(o, "name", a->name) == NULL ||
            cJSON_AddStringToObject(o, "id", a->id) == NULL ||
            cJSON_AddStringToObject(o, "address", a->address) == NULL ||
            cJSON_AddStringToObject(o, "target", a->target) == NULL ||
            cJSON_AddBoolToObject(o, "enabled", a->enabled) == NULL ||
            cJSON_AddStringToObject(o, "state", "disconnected") == NULL ||
            cJSON_AddStringToObject(o, "url", url) == NULL ||
            (a->superseded ? cJSON_AddStringToObject(o, "error", "superseded")
                           : cJSON_AddNullToObject(o, "error")) == NULL ||
            cJSON_AddBoolToObject(o, "superseded", a->superseded) == NULL ||
            cJSON_AddBoolToObject(o, "preserve_host", a->preserve_host) == NULL ||
            cJSON_AddNumberToObject(o, "max_inflight", a->max_inflight) == NULL ||
            cJSON_AddStringToObject(o, "id_header", a->id_header) == NULL ||
            cJSON_AddNumberToObject(o, "response_timeout", a->response_timeout_s) == NULL)
            goto fail_root;
    }
    if (cJSON_AddBoolToObject(root, "daemon", false) == NULL)
        goto fail_root;
    text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (text == NULL)
        goto fail_oom;
    printf("%s\n", text);
    free(text);
    return 0;

fail_root:
    cJSON_Delete(root);
fail_oom:
    fprintf(stderr, "tunnel-agent: status: out of memory\n");
    return -1;
}

static void status_text(struct ag_store *st, const struct ag_gateway *gw)
{
    char url[512];

    printf("daemon: not running (start it with: tunnel-agent run)\n");
    if (ag_store_count(st) == 0) {
        printf("no agents (create one with: tunnel-agent new NAME --target URL)\n");
        return;
    }
    printf("%-20s %-8s %-13s %s\n", "NAME", "ENABLED", "STATE", "URL");
    for (size_t i = 0; i < ag_store_count(st); i++) {
        const struct ag_agent *a = ag_store_agent(st, i);
        if (ag_store_public_url(gw, a->address, url, sizeof(url)) != 0)
            url[0] = '\0';
        printf("%-20s %-8s %-13s %s%s\n", a->name, a->enabled ? "yes" : "no", "disconnected", url,
               a->superseded ? "  (superseded by another machine with the same key)" : "");
    }
}

int ag_ctl_status(const char *home, bool json)
{
    char err[AG_STORE_ERR_LEN];
    struct ag_gateway gw;
    const struct ag_gateway *gwp = NULL;
    struct ag_store *st = ag_store_open(home, AG_STORE_READ, err, sizeof(err));
    int rc = 0;

    if (st == NULL) {
        fprintf(stderr, "tunnel-agent: %s\n", err);
        return -1;
    }
    if (ag_store_gateway(st) != NULL &&
        ag_store_gateway_parse(ag_store_gateway(st), &gw, err, sizeof(err)) == 0)
        gwp = &gw;
    if (json)
        rc = status_json(st, gwp);
    else
        status_text(st, gwp);
    ag_store_free(st);
    return rc;
}

int ag_ctl_states(const char *home, struct ag_ctl_state **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    return 0;
}

void ag_ctl_notify(const char *home)
{
}

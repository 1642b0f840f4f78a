/* Control socket (ag_ctl.h): the CLI's client, which falls back to the saved
 * settings when no daemon answers, and the daemon's server, a libevent
 * listener on <home>/agent.sock answering one JSON line per connection.
 * A second daemon is kept out by an flock on <home>/daemon.lock; the socket
 * file a killed daemon left behind is detected (nobody accepts) and
 * replaced. */
#include "ag_ctl.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "list.h"
#include "util.h"

#define CTL_TIMEOUT_S 5
#define CTL_LINE_MAX (64u * 1024u) /* request line */
#define CTL_ANSWER_MAX (16u << 20) /* answer the client accepts */

/* ---- client ------------------------------------------------------------- */

static int sock_path(const char *home, char *out, size_t len)
{
    return util_snprintf(out, len, "%s/%s", home, AG_CTL_SOCK_NAME) < 0 ? -1 : 0;
}

/* Connects to the daemon of home. Returns the fd, -2 when no daemon listens
 * (no socket file, or nobody accepting), -1 on another error. */
static int ctl_connect(const char *home)
{
    struct sockaddr_un sa;
    struct timeval tv = {CTL_TIMEOUT_S, 0};
    int fd;

    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    if (sock_path(home, sa.sun_path, sizeof(sa.sun_path)) != 0)
        return -1;
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd == -1)
        return -1;
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == -1) {
        int e = errno;
        close(fd);
        return (e == ENOENT || e == ECONNREFUSED || e == ENOTSOCK) ? -2 : -1;
    }
    return fd;
}

/* Sends one request line and reads the answer line into *answer (caller
 * frees). Returns 1 (answered), 0 (no daemon), -1 (error). */
static int ctl_request(const char *home, const char *req, char **answer)
{
    int fd = ctl_connect(home);
    size_t len = 0, cap = 4096;
    char *buf;

    *answer = NULL;
    if (fd == -2)
        return 0;
    if (fd < 0)
        return -1;
    if (write(fd, req, strlen(req)) != (ssize_t)strlen(req) || write(fd, "\n", 1) != 1)
        goto fail_fd;
    buf = malloc(cap);
    if (buf == NULL)
        goto fail_fd;
    for (;;) {
        ssize_t n;
        if (len + 1 == cap) {
            char *nb;
            if (cap >= CTL_ANSWER_MAX)
                goto fail_buf;
            nb = realloc(buf, cap * 2);
            if (nb == NULL)
                goto fail_buf;
            buf = nb;
            cap *= 2;
        }
        n = read(fd, buf + len, cap - len - 1);
        if (n == -1 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        if (memchr(buf + len - (size_t)n, '\n', (size_t)n) != NULL)
            break;
    }
    close(fd);
    buf[len] = '\0';
    if (len == 0) {
        free(buf);
        return -1;
    }
    buf[strcspn(buf, "\n")] = '\0';
    *answer = buf;
    return 1;

fail_buf:
    free(buf);
fail_fd:
    close(fd);
    return -1;
}

int ag_ctl_call(const char *home, const char *req, char **answer)
{
    return ctl_request(home, req, answer);
}

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
            cJSON_AddStringToObject(o, "preset", ag_store_preset_name(a->preset)) == NULL ||
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
        if (a->preset != AG_PRESET_NONE)
            printf("  preset: %s\n", ag_store_preset_name(a->preset));
    }
}

static const char *jstr(const cJSON *o, const char *name, const char *dflt)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);

    return cJSON_IsString(v) ? v->valuestring : dflt;
}

static double jnum(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);

    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

/* Prints the daemon's status object as a table. */
static void status_live_text(const cJSON *root)
{
    const cJSON *agents = cJSON_GetObjectItemCaseSensitive(root, "agents");
    const cJSON *gw = cJSON_GetObjectItemCaseSensitive(root, "gateway");
    const cJSON *a;

    printf("daemon: running, gateway %s (%s)\n", jstr(gw, "url", "?"), jstr(gw, "state", "?"));
    if (jstr(gw, "error", NULL) != NULL)
        printf("gateway error: %s\n", jstr(gw, "error", ""));
    if (cJSON_GetArraySize(agents) == 0) {
        printf("no agents (create one with: tunnel-agent new NAME --target URL)\n");
        return;
    }
    printf("%-20s %-8s %-13s %-9s %-8s %-8s %s\n", "NAME", "ENABLED", "STATE", "PROBE", "REQUESTS",
           "LOCAL", "URL");
    cJSON_ArrayForEach(a, agents)
    {
        const cJSON *en = cJSON_GetObjectItemCaseSensitive(a, "enabled");
        const cJSON *rtt = cJSON_GetObjectItemCaseSensitive(a, "probe_rtt_ms");
        const cJSON *lp = cJSON_GetObjectItemCaseSensitive(a, "last_probe_ms");
        char probe[32] = "-";
        if (cJSON_IsNumber(lp) && lp->valuedouble > 0 && cJSON_IsNumber(rtt))
            snprintf(probe, sizeof(probe), "%.0fms", rtt->valuedouble);
        printf("%-20s %-8s %-13s %-9s %-8.0f %-8s %s\n", jstr(a, "name", "?"),
               cJSON_IsTrue(en) ? "yes" : "no", jstr(a, "state", "?"), probe,
               jnum(a, "requests"), jstr(a, "local_result", "-"), jstr(a, "url", ""));
        if (strcmp(jstr(a, "preset", "none"), "none") != 0)
            printf("  preset: %s\n", jstr(a, "preset", ""));
        if (jstr(a, "error", NULL) != NULL && jstr(a, "error", "")[0] != '\0')
            printf("  error: %s\n", jstr(a, "error", ""));
    }
}

int ag_ctl_status(const char *home, bool json)
{
    char err[AG_STORE_ERR_LEN];
    struct ag_gateway gw;
    const struct ag_gateway *gwp = NULL;
    struct ag_store *st;
    char *answer = NULL;
    int rc = ctl_request(home, "{\"cmd\":\"status\"}", &answer);

    if (rc == 1) {
        cJSON *root = cJSON_Parse(answer);
        if (cJSON_IsObject(root)) {
            if (json)
                printf("%s\n", answer);
            else
                status_live_text(root);
            cJSON_Delete(root);
            free(answer);
            return 0;
        }
        cJSON_Delete(root);
        free(answer);
        rc = -1;
    }
    if (rc == -1)
        fprintf(stderr,
                "tunnel-agent: the daemon's control socket %s/%s does not answer; "
                "showing the saved settings\n",
                home, AG_CTL_SOCK_NAME);
    st = ag_store_open(home, AG_STORE_READ, err, sizeof(err));
    if (st == NULL) {
        fprintf(stderr, "tunnel-agent: %s\n", err);
        return -1;
    }
    if (ag_store_gateway(st) != NULL &&
        ag_store_gateway_parse(ag_store_gateway(st), &gw, err, sizeof(err)) == 0)
        gwp = &gw;
    rc = 0;
    if (json)
        rc = status_json(st, gwp);
    else
        status_text(st, gwp);
    ag_store_free(st);
    return rc;
}

/* ---- status --watch ----------------------------------------------------- */

#define WATCH_PERIOD_MS 1000

static uint64_t mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* What one watch round saw, kept for the next: requests per agent (for the
 * rate) and, without a terminal, the last line printed per agent. */
struct watch {
    bool tty;
    cJSON *prev_req;  /* name -> requests at prev_ms */
    cJSON *prev_line; /* name -> line (no timestamp) */
    uint64_t prev_ms;
    int daemon; /* -1 unknown, 0 not running, 1 running */
};

/* Requests per second of agent a since the previous round. */
static double watch_rate(struct watch *w, const cJSON *a, uint64_t now)
{
    const char *name = jstr(a, "name", "");
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(w->prev_req, name);
    double req = jnum(a, "requests");

    if (!cJSON_IsNumber(p) || now <= w->prev_ms || req < p->valuedouble)
        return 0;
    return (req - p->valuedouble) * 1000.0 / (double)(now - w->prev_ms);
}

static void watch_time(char *out, size_t len)
{
    time_t t = time(NULL);
    struct tm tm;

    if (gmtime_r(&t, &tm) == NULL || strftime(out, len, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        snprintf(out, len, "-");
}

static void watch_draw_tty(struct watch *w, const cJSON *root, uint64_t now)
{
    const cJSON *agents = cJSON_GetObjectItemCaseSensitive(root, "agents");
    const cJSON *gw = cJSON_GetObjectItemCaseSensitive(root, "gateway");
    const cJSON *a;
    char ts[32];

    watch_time(ts, sizeof(ts));
    printf("\033[H\033[2J"); /* home, clear */
    printf("tunnel-agent status --watch   %s   (q or Ctrl-C quits)\n", ts);
    if (root == NULL) {
        printf("daemon: not running (start it with: tunnel-agent run)\n");
        return;
    }
    printf("gateway %s: %s%s%s\n\n", jstr(gw, "url", "?"), jstr(gw, "state", "?"),
           jstr(gw, "error", NULL) != NULL ? " - " : "", jstr(gw, "error", ""));
    printf("%-20s %-12s %7s %9s %-8s %s\n", "NAME", "STATE", "REQ/S", "REQUESTS", "LOCAL", "URL");
    cJSON_ArrayForEach(a, agents)
    {
        const char *err = jstr(a, "error", NULL);
        printf("%-20s %-12s %7.1f %9.0f %-8s %s\n", jstr(a, "name", "?"), jstr(a, "state", "?"),
               watch_rate(w, a, now), jnum(a, "requests"), jstr(a, "local_result", "-"),
               jstr(a, "url", ""));
        if (err != NULL && err[0] != '\0')
            printf("  error: %.200s\n", err);
    }
}

static void watch_print_lines(struct watch *w, const cJSON *root, uint64_t now)
{
    const cJSON *agents = cJSON_GetObjectItemCaseSensitive(root, "agents");
    const cJSON *a;
    char ts[32];
    char line[1024];
    int daemon = root != NULL;

    watch_time(ts, sizeof(ts));
    if (daemon != w->daemon) {
        printf("%s daemon %s\n", ts, daemon ? "running" : "not running");
        w->daemon = daemon;
    }
    cJSON_ArrayForEach(a, agents)
    {
        const char *name = jstr(a, "name", "?");
        const char *err = jstr(a, "error", NULL);
        const cJSON *prev = cJSON_GetObjectItemCaseSensitive(w->prev_line, name);
        (void)util_snprintf(line, sizeof(line),
                            "agent=%s state=%s url=%s req/s=%.1f requests=%.0f local=%s error=%s",
                            name, jstr(a, "state", "?"), jstr(a, "url", ""),
                            watch_rate(w, a, now), jnum(a, "requests"),
                            jstr(a, "local_result", "-"),
                            err != NULL && err[0] != '\0' ? err : "-");
        if (cJSON_IsString(prev) && strcmp(prev->valuestring, line) == 0)
            continue;
        printf("%s %s\n", ts, line);
        cJSON_DeleteItemFromObjectCaseSensitive(w->prev_line, name);
        (void)cJSON_AddStringToObject(w->prev_line, name, line);
    }
}

/* One round: ask, draw, remember. */
static void watch_round(struct watch *w, const char *home)
{
    char *answer = NULL;
    cJSON *root = NULL;
    uint64_t now = mono_ms();
    const cJSON *a;

    if (ctl_request(home, "{\"cmd\":\"status\"}", &answer) == 1)
        root = cJSON_Parse(answer);
    free(answer);
    if (root != NULL && !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        root = NULL;
    }
    if (w->tty)
        watch_draw_tty(w, root, now);
    else
        watch_print_lines(w, root, now);
    fflush(stdout);
    cJSON_Delete(w->prev_req);
    w->prev_req = cJSON_CreateObject();
    w->prev_ms = now;
    cJSON_ArrayForEach(a, cJSON_GetObjectItemCaseSensitive(root, "agents"))
    {
        (void)cJSON_AddNumberToObject(w->prev_req, jstr(a, "name", ""), jnum(a, "requests"));
    }
    cJSON_Delete(root);
}

int ag_ctl_watch(const char *home)
{
    struct watch w = {.daemon = -1};
    struct termios old_tio, tio;
    bool raw = false;
    sigset_t mask, old_mask;
    int sfd;

    w.tty = isatty(STDOUT_FILENO) == 1;
    w.prev_line = cJSON_CreateObject();
    if (w.prev_line == NULL) {
        fprintf(stderr, "tunnel-agent: status: out of memory\n");
        return -1;
    }
    /* SIGINT / SIGTERM arrive on a signalfd: no handler, no global flag */
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &mask, &old_mask) == -1 ||
        (sfd = signalfd(-1, &mask, SFD_CLOEXEC)) == -1) {
        fprintf(stderr, "tunnel-agent: status --watch: signals: %s\n", strerror(errno));
        cJSON_Delete(w.prev_line);
        return -1;
    }
    if (w.tty && isatty(STDIN_FILENO) == 1 && tcgetattr(STDIN_FILENO, &old_tio) == 0) {
        tio = old_tio;
        tio.c_lflag &= ~(tcflag_t)(ICANON | ECHO); /* keys at once; Ctrl-C stays a signal */
        tio.c_cc[VMIN] = 1;
        tio.c_cc[VTIME] = 0;
        raw = tcsetattr(STDIN_FILENO, TCSANOW, &tio) == 0;
    }
    if (w.tty)
        printf("\033[?25l"); /* hide the cursor */
    for (;;) {
        struct pollfd pfd[2] = {{.fd = sfd, .events = POLLIN}, {.fd = STDIN_FILENO, .events = POLLIN}};
        uint64_t until;
        bool quit = false;

        watch_round(&w, home);
        until = mono_ms() + WATCH_PERIOD_MS;
        while (!quit) {
            uint64_t now = mono_ms();
            int r;
            if (now >= until)
                break;
            r = poll(pfd, raw ? 2 : 1, (int)(until - now));
            if (r == -1 && errno != EINTR)
                quit = true;
            if (r > 0 && (pfd[0].revents & POLLIN) != 0) {
                struct signalfd_siginfo si;
                /* taken here, so it is not delivered when unblocked below */
                (void)!read(sfd, &si, sizeof(si));
                quit = true;
            }
            if (r > 0 && raw && (pfd[1].revents & (POLLIN | POLLHUP)) != 0) {
                char ch = 0;
                ssize_t n = read(STDIN_FILENO, &ch, 1);
                if (n <= 0 || ch == 'q' || ch == 'Q' || ch == 3 /* ^C */)
                    quit = true;
            }
        }
        if (quit)
            break;
    }
    if (w.tty)
        printf("\033[?25h\n"); /* the cursor back */
    fflush(stdout);
    if (raw)
        (void)tcsetattr(STDIN_FILENO, TCSANOW, &old_tio);
    close(sfd);
    (void)sigprocmask(SIG_SETMASK, &old_mask, NULL);
    cJSON_Delete(w.prev_req);
    cJSON_Delete(w.prev_line);
    return 0;
}

int ag_ctl_states(const char *home, struct ag_ctl_state **out, size_t *n)
{
    char *answer = NULL;
    int rc = ctl_request(home, "{\"cmd\":\"status\"}", &answer);
    cJSON *root, *agents, *a;
    size_t i = 0;

    *out = NULL;
    *n = 0;
    if (rc != 1)
        return rc == 0 ? 0 : -1;
    root = cJSON_Parse(answer);
    free(answer);
    agents = cJSON_GetObjectItemCaseSensitive(root, "agents");
    if (!cJSON_IsArray(agents)) {
        cJSON_Delete(root);
        return -1;
    }
    *out = calloc((size_t)cJSON_GetArraySize(agents) + 1, sizeof(**out));
    if (*out == NULL) {
        cJSON_Delete(root);
        return -1;
    }
    cJSON_ArrayForEach(a, agents)
    {
        snprintf((*out)[i].name, sizeof((*out)[i].name), "%s", jstr(a, "name", ""));
        snprintf((*out)[i].state, sizeof((*out)[i].state), "%s", jstr(a, "state", ""));
        snprintf((*out)[i].error, sizeof((*out)[i].error), "%s", jstr(a, "error", ""));
        i++;
    }
    *n = i;
    cJSON_Delete(root);
    return 1;
}

void ag_ctl_notify(const char *home)
{
    char *answer = NULL;

    if (ctl_request(home, "{\"cmd\":\"reload\"}", &answer) == -1)
        fprintf(stderr, "tunnel-agent: the running daemon did not confirm the reload\n");
    free(answer);
}

/* ---- server --------------------------------------------------------------- */

/* One control connection. Owned by its server (srv->clients); freed from its
 * own bufferevent callbacks (answer written, EOF, error, timeout, an
 * over-long line) or with the server. */
struct ctl_client {
    struct ag_ctl_server *srv;
    struct list link; /* srv->clients */
    struct bufferevent *bev;
};

struct ag_ctl_server {
    struct event_base *base;
    struct evconnlistener *lsn;
    ag_ctl_handler_cb cb;
    void *arg;
    int lock_fd;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    dev_t dev; /* identity of the socket file we bound */
    ino_t ino;
    struct list clients; /* struct ctl_client */
};

static void client_free(struct ctl_client *c)
{
    list_unlink(&c->link);
    bufferevent_free(c->bev);
    free(c);
}

static void client_on_write(struct bufferevent *bev, void *arg)
{
    client_free(arg); /* the answer is out */
}

static void client_on_event(struct bufferevent *bev, short what, void *arg) { client_free(arg); }

static void client_on_read(struct bufferevent *bev, void *arg)
{
    struct ctl_client *c = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    size_t n = 0;
    char *line = evbuffer_readln(in, &n, EVBUFFER_EOL_LF);
    char *answer;
    struct evbuffer *out = bufferevent_get_output(bev);

    if (line == NULL) {
        if (evbuffer_get_length(in) > CTL_LINE_MAX)
            client_free(c);
        return;
    }
    answer = c->srv->cb(c->srv->arg, line);
    free(line);
    bufferevent_disable(bev, EV_READ);
    if (answer != NULL) {
        evbuffer_add(out, answer, strlen(answer));
        free(answer);
    } else {
        evbuffer_add_printf(out, "{\"error\":\"bad_request\"}");
    }
    evbuffer_add(out, "\n", 1);
    bufferevent_setcb(bev, NULL, client_on_write, client_on_event, c);
}

static void on_accept(struct evconnlistener *lsn, evutil_socket_t fd, struct sockaddr *sa,
                      int salen, void *arg)
{
    struct ag_ctl_server *s = arg;
    struct ctl_client *c = calloc(1, sizeof(*c));
    struct timeval tv = {CTL_TIMEOUT_S, 0};

    if (c == NULL) {
        evutil_closesocket(fd);
        return;
    }
    c->srv = s;
    c->bev = bufferevent_socket_new(s->base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (c->bev == NULL) {
        evutil_closesocket(fd);
        free(c);
        return;
    }
    list_insert_head(&s->clients, &c->link);
    bufferevent_setcb(c->bev, client_on_read, NULL, client_on_event, c);
    bufferevent_set_timeouts(c->bev, &tv, &tv);
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
}

struct ag_ctl_server *ag_ctl_server_new(struct event_base *base, const char *home,
                                        ag_ctl_handler_cb cb, void *arg, bool *busy, char *err,
                                        size_t errlen)
{
    struct ag_ctl_server *s = calloc(1, sizeof(*s));
    char lock_path[4096];
    struct sockaddr_un sa;
    struct stat stbuf;
    int fd, probe;

    *busy = false;
    if (s == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->base = base;
    s->cb = cb;
    s->arg = arg;
    list_init(&s->clients);
    if (util_snprintf(lock_path, sizeof(lock_path), "%s/%s", home, AG_CTL_LOCK_NAME) < 0 ||
        sock_path(home, s->path, sizeof(s->path)) != 0) {
        snprintf(err, errlen, "home directory path too long for a control socket: %s", home);
        goto fail_s;
    }
    s->lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (s->lock_fd == -1) {
        snprintf(err, errlen, "%s: %s", lock_path, strerror(errno));
        goto fail_s;
    }
    if (flock(s->lock_fd, LOCK_EX | LOCK_NB) == -1) {
        *busy = errno == EWOULDBLOCK;
        snprintf(err, errlen, *busy ? "another tunnel-agent daemon is running for %s" : "%s: %s",
                 *busy ? home : lock_path, strerror(errno));
        goto fail_lock;
    }
    /* Someone accepting on the socket is a live daemon; otherwise the file
     * is stale (a killed daemon) and is replaced. */
    probe = ctl_connect(home);
    if (probe >= 0) {
        close(probe);
        *busy = true;
        snprintf(err, errlen, "another tunnel-agent daemon is running for %s", home);
        goto fail_lock;
    }
    if (unlink(s->path) == -1 && errno != ENOENT) {
        snprintf(err, errlen, "cannot remove the stale socket %s: %s", s->path, strerror(errno));
        goto fail_lock;
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        goto fail_lock;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, s->path, sizeof(sa.sun_path));
    {
        mode_t old = umask(0177); /* the socket is created 0600 */
        int rc = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
        int e = errno;
        umask(old);
        if (rc == -1) {
            snprintf(err, errlen, "bind %s: %s", s->path, strerror(e));
            goto fail_fd;
        }
    }
    if (chmod(s->path, 0600) == -1 || stat(s->path, &stbuf) == -1 || listen(fd, 16) == -1) {
        snprintf(err, errlen, "%s: %s", s->path, strerror(errno));
        goto fail_unlink;
    }
    s->dev = stbuf.st_dev;
    s->ino = stbuf.st_ino;
    s->lsn = evconnlistener_new(base, on_accept, s, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC,
                                -1, fd);
    if (s->lsn == NULL) {
        snprintf(err, errlen, "out of memory");
        goto fail_unlink;
    }
    return s;

fail_unlink:
    unlink(s->path);
fail_fd:
    close(fd);
fail_lock:
    close(s->lock_fd);
fail_s:
    free(s);
    return NULL;
}

void ag_ctl_server_free(struct ag_ctl_server *s)
{
    struct stat st;
    struct list *n, *tmp;

    if (s == NULL)
        return;
    LIST_FOREACH_SAFE(n, tmp, &s->clients)
    {
        client_free(LIST_ENTRY(n, struct ctl_client, link));
    }
    evconnlistener_free(s->lsn);
    if (stat(s->path, &st) == 0 && st.st_dev == s->dev && st.st_ino == s->ino)
        unlink(s->path);
    close(s->lock_fd);
    free(s);
}

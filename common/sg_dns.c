/*
 * sg: DNS for delivery, through libunbound on nginx's event loop.
 *
 * libunbound runs its resolver in a thread of its own (ub_ctx_async(ctx,
 * 1)); answers come back through a pipe, ub_fd(), which an nginx
 * connection watches (level-triggered): ub_process() then calls
 * sg_dns_callback() for each answer, in the worker's thread.
 *
 * A request owns one pool: its own state, and the route or answer handed
 * to its handler, who destroys it.  Every libunbound query still running
 * when a request ends is cancelled (ub_cancel: its callback is never
 * called), so no answer can reach freed memory.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <pthread.h>
#include <signal.h>
#include <unbound.h>

#include "sg_core.h"
#include "sg_dns.h"
#include "sg_dns_rr.h"
#include "sg_addr.h"


#define SG_DNS_ROOT_KEY       "/usr/share/dns/root.key"

#define SG_DNS_TYPE_A         1
#define SG_DNS_TYPE_MX        15
#define SG_DNS_TYPE_AAAA      28
#define SG_DNS_CLASS_IN       1
#define SG_DNS_NXDOMAIN       3

#define SG_DNS_MX_MAX         64        /* MX records read from an answer */
#define SG_DNS_RDATA_MAX      65535     /* RFC 1035 3.2.1: RDLENGTH */
#define SG_DNS_POOL_SIZE      4096
#define SG_DNS_REASON_LEN     512
#define SG_DNS_WHY_LEN        320
#define SG_DNS_NQUERIES       (1 + 2 * SG_DNS_MAX_HOSTS)


typedef enum {
    SG_DNS_Q_MX = 0,
    SG_DNS_Q_ADDR,
    SG_DNS_Q_RAW
} sg_dns_q_kind_e;


/* one libunbound query */
typedef struct {
    sg_dns_req_t        *req;
    int                  id;            /* libunbound's async id */
    sg_dns_q_kind_e      kind;
    ngx_uint_t           rrtype;
    ngx_uint_t           host;          /* index in req->hosts */
    unsigned             running:1;
} sg_dns_q_t;


/* a host while its addresses are looked up */
typedef struct {
    ngx_str_t            name;          /* NUL-terminated */
    ngx_uint_t           pref;
    sg_dns_rr_ip_t       v4[SG_DNS_MAX_ADDRS];
    sg_dns_rr_ip_t       v6[SG_DNS_MAX_ADDRS];
    ngx_uint_t           nv4;
    ngx_uint_t           nv6;
    u_char              *why;           /* its first failure, for people */
    unsigned             insecure:1;    /* an answer was not secure */
    unsigned             tempfail:1;
    unsigned             why_temp:1;    /* why tells a temporary failure */
} sg_dns_work_t;


struct sg_dns_req_s {
    ngx_queue_t          queue;         /* sg_dns.requests */
    ngx_pool_t          *pool;
    ngx_event_t          timer;
    ngx_event_t          post;          /* answers known without DNS */
    ngx_msec_t           timeout;
    ngx_str_t            name;          /* NUL-terminated */

    sg_dns_route_pt      route_handler;
    sg_dns_answer_pt     answer_handler;
    void                *data;
    sg_dns_route_t      *route;
    sg_dns_answer_t     *answer;

    sg_dns_work_t       *hosts;
    ngx_uint_t           nhosts;

    sg_dns_q_t           q[SG_DNS_NQUERIES];
    ngx_uint_t           nq;
    ngx_uint_t           running;

    u_char              *reason;        /* SG_DNS_REASON_LEN */
    unsigned             mx:1;
};


static struct {
    struct ub_ctx       *ctx;
    ngx_connection_t    *c;
    ngx_log_t           *log;
    ngx_queue_t          requests;
    ngx_str_t            self;          /* RFC 5321, 5.1: our own name */
    unsigned             validating:1;
    unsigned             thread:1;      /* libunbound's thread runs */
    unsigned             broken:1;
} sg_dns;


static ngx_int_t sg_dns_forwarder(ngx_cycle_t *cycle, ngx_str_t *resolver,
    u_char *buf, size_t size);
static void sg_dns_read_handler(ngx_event_t *ev);
static void sg_dns_write_handler(ngx_event_t *ev);
static sg_dns_req_t *sg_dns_req_create(ngx_msec_t timeout, void *data);
static void sg_dns_req_post(sg_dns_req_t *req);
static ngx_int_t sg_dns_start(sg_dns_req_t *req, sg_dns_q_kind_e kind,
    ngx_uint_t rrtype, ngx_uint_t host, const char *name, const char **err);
static ngx_uint_t sg_dns_start_host(sg_dns_req_t *req, ngx_uint_t host);
static void sg_dns_callback(void *data, int err, struct ub_result *res);
static void sg_dns_mx_done(sg_dns_req_t *req, int err,
    struct ub_result *res);
static void sg_dns_mx_hosts(sg_dns_req_t *req, struct ub_result *res);
static void sg_dns_addr_done(sg_dns_req_t *req, sg_dns_q_t *q, int err,
    struct ub_result *res);
static void sg_dns_host_failed(sg_dns_req_t *req, sg_dns_work_t *h,
    ngx_uint_t rrtype, ngx_uint_t tempfail, const char *what);
static void sg_dns_raw_done(sg_dns_req_t *req, int err,
    struct ub_result *res);
static void sg_dns_route_done(sg_dns_req_t *req);
static ngx_int_t sg_dns_set_host(ngx_pool_t *pool, sg_dns_host_t *host,
    sg_dns_work_t *w);
static void sg_dns_route_fail(sg_dns_req_t *req, sg_dns_status_e status);
static void sg_dns_timeout_handler(ngx_event_t *ev);
static void sg_dns_post_handler(ngx_event_t *ev);
static void sg_dns_stop(sg_dns_req_t *req);
static void sg_dns_finish(sg_dns_req_t *req);
static unsigned long sg_dns_random(void *data, unsigned long n);


/* per worker */


ngx_int_t
sg_dns_init_worker(ngx_cycle_t *cycle)
{
    int                rc;
    char              *ta;
    struct ub_ctx     *ctx;
    sg_core_conf_t    *scf;
    ngx_connection_t  *c;
    u_char             fwd[NGX_SOCKADDR_STRLEN + 8];

    ngx_memzero(&sg_dns, sizeof(sg_dns));
    ngx_queue_init(&sg_dns.requests);
    sg_dns.log = cycle->log;

    scf = sg_core_conf(cycle);

    ctx = ub_ctx_create();
    if (ctx == NULL) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                      "sg: DNS: ub_ctx_create() failed");
        return NGX_ERROR;
    }

    /*
     * A thread, not libunbound's default child process: a child would
     * inherit every socket of the worker.
     */

    rc = ub_ctx_async(ctx, 1);
    if (rc != 0) {
        ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                      "sg: DNS: ub_ctx_async() failed: %s", ub_strerror(rc));
        ub_ctx_delete(ctx);
        return NGX_ERROR;
    }

    /* a resolver on loopback (a local cache, the tests' server) is fine */

    rc = ub_ctx_set_option(ctx, "do-not-query-localhost:", "no");
    if (rc != 0) {
        goto failed;
    }

    /*
     * records in the order the server gave: the random order among equal
     * MX preferences is sg's own (sg_dns_rr_mx_order), not libunbound's
     * rotation by the clock
     */

    rc = ub_ctx_set_option(ctx, "rrset-roundrobin:", "no");
    if (rc != 0) {
        goto failed;
    }

    if (scf->resolver.len) {
        if (sg_dns_forwarder(cycle, &scf->resolver, fwd, sizeof(fwd))
            != NGX_OK)
        {
            ub_ctx_delete(ctx);
            return NGX_ERROR;
        }

        rc = ub_ctx_set_fwd(ctx, (char *) fwd);
        if (rc != 0) {
            goto failed;
        }

        /*
         * RFC 6761, 6.2: "test." names are for testing; libunbound would
         * answer NXDOMAIN itself.  The server named by sg_resolver decides.
         */

        rc = ub_ctx_set_option(ctx, "local-zone:", "test. transparent");
        if (rc != 0) {
            goto failed;
        }

    } else {
        rc = ub_ctx_resolvconf(ctx, NULL);
        if (rc != 0) {
            ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                          "sg: DNS: cannot use /etc/resolv.conf (%s):"
                          " resolving from the root servers",
                          ub_strerror(rc));
        }
    }

    /*
     * DNSSEC: with sg_dnssec_trust_anchor, always; without it, Debian's
     * root key when the system's resolvers are used.  A resolver named by
     * sg_resolver may not pass DNSSEC records on (dnsmasq, test servers),
     * and a validator behind it would then call every answer bogus.
     */

    ta = NULL;

    if (scf->dnssec_trust_anchor.len) {
        ta = ngx_pnalloc(cycle->pool, scf->dnssec_trust_anchor.len + 1);
        if (ta == NULL) {
            ub_ctx_delete(ctx);
            return NGX_ERROR;
        }

        ngx_cpystrn((u_char *) ta, scf->dnssec_trust_anchor.data,
                    scf->dnssec_trust_anchor.len + 1);

    } else if (scf->resolver.len == 0
               && access(SG_DNS_ROOT_KEY, R_OK) == 0)
    {
        ta = SG_DNS_ROOT_KEY;
    }

    if (ta) {
        rc = ub_ctx_add_ta_file(ctx, ta);
        if (rc != 0) {
            goto failed;
        }
    }

    /*
     * Apply the configuration now (libunbound does it at the first query
     * otherwise), so that an unreadable trust anchor shows here: removing
     * a local zone that does not exist finalizes the context, and nothing
     * else.
     */

    rc = ub_ctx_zone_remove(ctx, "sg-no-such-zone.invalid.");
    if (rc != 0) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "sg: DNS is off in this worker: libunbound: %s%s%s%s",
                      ub_strerror(rc),
                      ta ? " (can the worker read the trust anchor \"" : "",
                      ta ? ta : "", ta ? "\"?)" : "");
        ub_ctx_delete(ctx);
        return NGX_OK;
    }

    c = ngx_get_connection(ub_fd(ctx), cycle->log);
    if (c == NULL) {
        ub_ctx_delete(ctx);
        return NGX_ERROR;
    }

    c->data = &sg_dns;
    c->log = cycle->log;
    c->read->log = cycle->log;
    c->write->log = cycle->log;
    c->read->handler = sg_dns_read_handler;
    c->write->handler = sg_dns_write_handler;

    if (ngx_add_event(c->read, NGX_READ_EVENT, NGX_LEVEL_EVENT) != NGX_OK) {
        ngx_free_connection(c);
        c->fd = (ngx_socket_t) -1;
        ub_ctx_delete(ctx);
        return NGX_ERROR;
    }

    sg_dns.ctx = ctx;
    sg_dns.c = c;
    sg_dns.validating = (ta != NULL);
    sg_dns.self = cycle->hostname;      /* lower case */

    ngx_log_debug3(NGX_LOG_DEBUG_CORE, cycle->log, 0,
                   "sg dns: resolver %s, DNSSEC trust anchor %s, own name %V",
                   scf->resolver.len ? (char *) fwd : "from resolv.conf",
                   ta ? ta : "none", &sg_dns.self);

    return NGX_OK;

failed:

    ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                  "sg: DNS: libunbound setup failed: %s", ub_strerror(rc));
    ub_ctx_delete(ctx);

    return NGX_ERROR;
}


void
sg_dns_exit_worker(void)
{
    ngx_queue_t       *q;
    sg_dns_req_t      *req;
    ngx_connection_t  *c;

    if (sg_dns.log == NULL) {
        return;
    }

    /* the handlers are not called: their owners are going away too */

    while (!ngx_queue_empty(&sg_dns.requests)) {
        q = ngx_queue_head(&sg_dns.requests);
        req = ngx_queue_data(q, sg_dns_req_t, queue);

        sg_dns_stop(req);
        ngx_destroy_pool(req->pool);
    }

    c = sg_dns.c;

    if (c) {
        if (c->read->posted) {
            ngx_delete_posted_event(c->read);
        }

        if (c->read->active) {
            (void) ngx_del_event(c->read, NGX_READ_EVENT, 0);
        }

        /* libunbound closes its pipe */
        ngx_free_connection(c);
        c->fd = (ngx_socket_t) -1;
    }

    if (sg_dns.ctx) {
        ub_ctx_delete(sg_dns.ctx);
    }

    ngx_memzero(&sg_dns, sizeof(sg_dns));
}


ngx_uint_t
sg_dns_validating(void)
{
    return sg_dns.validating;
}


/* "ip[:port]" (as sg_resolver checked it) to libunbound's "ip@port" */

static ngx_int_t
sg_dns_forwarder(ngx_cycle_t *cycle, ngx_str_t *resolver, u_char *buf,
    size_t size)
{
    size_t      n;
    in_port_t   port;
    ngx_addr_t  addr;
    u_char      text[NGX_SOCKADDR_STRLEN];

    if (ngx_parse_addr_port(cycle->pool, &addr, resolver->data,
                            resolver->len)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "sg: DNS: invalid resolver \"%V\"", resolver);
        return NGX_ERROR;
    }

    port = ngx_inet_get_port(addr.sockaddr);
    if (port == 0) {
        port = 53;
    }

    n = ngx_sock_ntop(addr.sockaddr, addr.socklen, text, sizeof(text), 0);

    ngx_snprintf(buf, size - 1, "%*s@%d%Z", n, text, (int) port);

    return NGX_OK;
}


static void
sg_dns_read_handler(ngx_event_t *ev)
{
    int                rc;
    ngx_connection_t  *c;

    c = ev->data;

    if (sg_dns.ctx == NULL) {
        return;
    }

    /* every answer waiting in the pipe; callbacks run from here */

    rc = ub_process(sg_dns.ctx);

    if (rc != 0 && !sg_dns.broken) {
        /*
         * libunbound's thread is gone: the requests still waiting end by
         * their timers, new ones are refused.
         */

        ngx_log_error(NGX_LOG_ALERT, sg_dns.log, 0,
                      "sg: DNS: ub_process() failed: %s, DNS is off in"
                      " this worker", ub_strerror(rc));

        sg_dns.broken = 1;

        if (c->read->active) {
            (void) ngx_del_event(c->read, NGX_READ_EVENT, 0);
        }
    }
}


static void
sg_dns_write_handler(ngx_event_t *ev)
{
    /* never armed: libunbound's pipe is only read */
}


/* requests */


sg_dns_req_t *
sg_dns_route(ngx_str_t *name, ngx_uint_t mx, sg_dns_route_pt handler,
    void *data)
{
    return sg_dns_route_within(name, mx, SG_DNS_TIMEOUT, handler, data);
}


sg_dns_req_t *
sg_dns_route_within(ngx_str_t *name, ngx_uint_t mx, ngx_msec_t timeout,
    sg_dns_route_pt handler, void *data)
{
    size_t            n;
    const char       *msg, *err;
    sg_dns_req_t     *req;
    sg_dns_route_t   *route;
    sg_dns_work_t    *w;
    sg_dns_rr_ip_t    ip;
    char              canon[SG_ADDR_TEXT_MAX];
    char              text[SG_DNS_RR_IP_TEXT];

    if (sg_dns.ctx == NULL || sg_dns.broken) {
        return NULL;
    }

    req = sg_dns_req_create(timeout, data);
    if (req == NULL) {
        return NULL;
    }

    route = ngx_pcalloc(req->pool, sizeof(sg_dns_route_t));
    if (route == NULL) {
        goto failed;
    }

    route->pool = req->pool;
    req->route = route;
    req->route_handler = handler;
    req->mx = mx ? 1 : 0;

    /*
     * An IP address where a host is expected (a relay host, an internal
     * server; a domain written as an RFC 5321, 4.1.3 address literal):
     * that address, without DNS.
     */

    if (sg_dns_rr_ip_literal((char *) name->data, name->len, &ip) == 0) {

        req->hosts = ngx_pcalloc(req->pool, sizeof(sg_dns_work_t));
        if (req->hosts == NULL
            || sg_dns_rr_ip_text(&ip, text, sizeof(text)) != 0)
        {
            goto failed;
        }

        w = &req->hosts[0];
        req->nhosts = 1;

        n = ngx_strlen(text);
        w->name.data = ngx_pnalloc(req->pool, n + 1);
        if (w->name.data == NULL) {
            goto failed;
        }

        ngx_memcpy(w->name.data, text, n + 1);
        w->name.len = n;
        w->insecure = 1;

        if (ip.family == 4) {
            w->v4[w->nv4++] = ip;

        } else {
            w->v6[w->nv6++] = ip;
        }

        route->implicit = req->mx;
        req->name = w->name;

        sg_dns_req_post(req);
        return req;
    }

    msg = sg_addr_host_name((char *) name->data, name->len, 0, canon,
                            sizeof(canon));

    if (msg) {
        ngx_str_set(&req->name, "");
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "\"%*s\" is not a valid %s name: %s%Z",
                     ngx_min(name->len, 255), name->data,
                     req->mx ? "domain" : "host", msg);
        route->status = SG_DNS_NOT_FOUND;
        route->reason = (const char *) req->reason;

        sg_dns_req_post(req);
        return req;
    }

    n = ngx_strlen(canon);

    req->name.data = ngx_pnalloc(req->pool, n + 1);
    if (req->name.data == NULL) {
        goto failed;
    }

    ngx_memcpy(req->name.data, canon, n + 1);
    req->name.len = n;

    if (req->mx) {
        if (sg_dns_start(req, SG_DNS_Q_MX, SG_DNS_TYPE_MX, 0,
                         (char *) req->name.data, &err)
            != NGX_OK)
        {
            goto failed;
        }

    } else {
        req->hosts = ngx_pcalloc(req->pool, sizeof(sg_dns_work_t));
        if (req->hosts == NULL) {
            goto failed;
        }

        req->nhosts = 1;
        req->hosts[0].name = req->name;

        if (sg_dns_start_host(req, 0) == 0) {
            goto failed;
        }
    }

    ngx_add_timer(&req->timer, req->timeout);

    ngx_log_debug3(NGX_LOG_DEBUG_CORE, sg_dns.log, 0,
                   "sg dns: %s %V: started %p",
                   req->mx ? "MX" : "host", &req->name, req);

    return req;

failed:

    sg_dns_stop(req);
    ngx_destroy_pool(req->pool);

    return NULL;
}


sg_dns_req_t *
sg_dns_query(ngx_str_t *name, ngx_uint_t rrtype, sg_dns_answer_pt handler,
    void *data)
{
    u_char           *p, *last, ch, prev;
    ngx_uint_t        valid;
    const char       *err;
    sg_dns_req_t     *req;
    sg_dns_answer_t  *a;

    if (sg_dns.ctx == NULL || sg_dns.broken) {
        return NULL;
    }

    req = sg_dns_req_create(SG_DNS_TIMEOUT, data);
    if (req == NULL) {
        return NULL;
    }

    a = ngx_pcalloc(req->pool, sizeof(sg_dns_answer_t));
    if (a == NULL) {
        goto failed;
    }

    a->pool = req->pool;
    a->rcode = -1;
    req->answer = a;
    req->answer_handler = handler;

    /* lower case, no trailing dot */

    last = name->data + name->len;

    if (name->len > 1 && last[-1] == '.') {
        last--;
    }

    req->name.data = ngx_pnalloc(req->pool, last - name->data + 1);
    if (req->name.data == NULL) {
        goto failed;
    }

    req->name.len = last - name->data;
    ngx_strlow(req->name.data, name->data, req->name.len);
    req->name.data[req->name.len] = '\0';

    /*
     * Names of LDH labels and service labels ("_mta-sts", "_25._tcp",
     * RFC 8461 3.1, RFC 7672 2.2); anything else cannot be in DNS as a
     * name sg asks for, and is answered NXDOMAIN without asking.
     */

    valid = (req->name.len > 0 && req->name.len <= SG_DNS_RR_NAME_MAX);
    prev = '.';

    for (p = req->name.data; valid && p < req->name.data + req->name.len;
         p++)
    {
        ch = *p;

        if (ch == '.' && prev == '.') {
            valid = 0;

        } else if (ch != '.' && ch != '-' && ch != '_'
                   && !(ch >= 'a' && ch <= 'z') && !(ch >= '0' && ch <= '9'))
        {
            valid = 0;
        }

        prev = ch;
    }

    if (!valid) {
        a->rcode = SG_DNS_NXDOMAIN;
        sg_dns_req_post(req);
        return req;
    }

    if (sg_dns_start(req, SG_DNS_Q_RAW, rrtype, 0, (char *) req->name.data,
                     &err)
        != NGX_OK)
    {
        goto failed;
    }

    ngx_add_timer(&req->timer, req->timeout);

    ngx_log_debug3(NGX_LOG_DEBUG_CORE, sg_dns.log, 0,
                   "sg dns: type %ui %V: started %p", rrtype, &req->name,
                   req);

    return req;

failed:

    sg_dns_stop(req);
    ngx_destroy_pool(req->pool);

    return NULL;
}


void
sg_dns_cancel(sg_dns_req_t *req)
{
    if (req == NULL) {
        return;
    }

    ngx_log_debug1(NGX_LOG_DEBUG_CORE, sg_dns.log, 0,
                   "sg dns: %p cancelled", req);

    sg_dns_stop(req);
    ngx_destroy_pool(req->pool);
}


static sg_dns_req_t *
sg_dns_req_create(ngx_msec_t timeout, void *data)
{
    ngx_pool_t    *pool;
    sg_dns_req_t  *req;

    pool = ngx_create_pool(SG_DNS_POOL_SIZE, sg_dns.log);
    if (pool == NULL) {
        return NULL;
    }

    req = ngx_pcalloc(pool, sizeof(sg_dns_req_t));
    if (req == NULL) {
        ngx_destroy_pool(pool);
        return NULL;
    }

    req->reason = ngx_pnalloc(pool, SG_DNS_REASON_LEN);
    if (req->reason == NULL) {
        ngx_destroy_pool(pool);
        return NULL;
    }

    req->reason[0] = '\0';
    req->pool = pool;
    req->data = data;
    req->timeout = (timeout == 0 || timeout > SG_DNS_TIMEOUT)
                   ? SG_DNS_TIMEOUT : timeout;

    req->timer.handler = sg_dns_timeout_handler;
    req->timer.data = req;
    req->timer.log = sg_dns.log;

    req->post.handler = sg_dns_post_handler;
    req->post.data = req;
    req->post.log = sg_dns.log;

    ngx_queue_insert_tail(&sg_dns.requests, &req->queue);

    return req;
}


/* answered without DNS, but never from inside the starting call */

static void
sg_dns_req_post(sg_dns_req_t *req)
{
    ngx_post_event(&req->post, &ngx_posted_events);
}


static ngx_int_t
sg_dns_start(sg_dns_req_t *req, sg_dns_q_kind_e kind, ngx_uint_t rrtype,
    ngx_uint_t host, const char *name, const char **err)
{
    int          rc;
    sigset_t     all, old;
    sg_dns_q_t  *q;

    if (req->nq == SG_DNS_NQUERIES) {
        *err = "too many queries";
        return NGX_ERROR;
    }

    q = &req->q[req->nq];
    q->req = req;
    q->kind = kind;
    q->rrtype = rrtype;
    q->host = host;

    /*
     * The first query starts libunbound's thread, which inherits the
     * signal mask: with every signal blocked there, nginx's signals
     * (reload, quit) reach the worker's own thread.
     */

    if (!sg_dns.thread) {
        sigfillset(&all);
        (void) pthread_sigmask(SIG_BLOCK, &all, &old);
    }

    rc = ub_resolve_async(sg_dns.ctx, (char *) name, (int) rrtype,
                          SG_DNS_CLASS_IN, q, sg_dns_callback, &q->id);

    if (!sg_dns.thread) {
        (void) pthread_sigmask(SIG_SETMASK, &old, NULL);
    }

    if (rc != 0) {
        ngx_log_error(NGX_LOG_ERR, sg_dns.log, 0,
                      "sg: DNS: cannot look up %s: %s", name,
                      ub_strerror(rc));
        *err = ub_strerror(rc);
        return NGX_ERROR;
    }

    sg_dns.thread = 1;

    q->running = 1;
    req->nq++;
    req->running++;

    return NGX_OK;
}


/* A and AAAA of one host: the number of queries started */

static ngx_uint_t
sg_dns_start_host(sg_dns_req_t *req, ngx_uint_t host)
{
    ngx_uint_t      n, i;
    const char     *err;
    sg_dns_work_t  *h;

    static ngx_uint_t  types[] = { SG_DNS_TYPE_A, SG_DNS_TYPE_AAAA };

    h = &req->hosts[host];
    n = 0;

    for (i = 0; i < 2; i++) {
        if (sg_dns_start(req, SG_DNS_Q_ADDR, types[i], host,
                         (char *) h->name.data, &err)
            == NGX_OK)
        {
            n++;
            continue;
        }

        sg_dns_host_failed(req, h, types[i], 1, err);
    }

    return n;
}


static void
sg_dns_callback(void *data, int err, struct ub_result *res)
{
    sg_dns_q_t    *q = data;
    sg_dns_req_t  *req;

    req = q->req;

    q->running = 0;
    req->running--;

    ngx_log_debug5(NGX_LOG_DEBUG_CORE, sg_dns.log, 0,
                   "sg dns: %p type %ui of %s: err %d rcode %d", req,
                   q->rrtype, res ? res->qname : "-", err,
                   res ? res->rcode : -1);

    /* the handler may destroy req, res is libunbound's */

    switch (q->kind) {

    case SG_DNS_Q_MX:
        sg_dns_mx_done(req, err, res);
        break;

    case SG_DNS_Q_ADDR:
        sg_dns_addr_done(req, q, err, res);
        break;

    default: /* SG_DNS_Q_RAW */
        sg_dns_raw_done(req, err, res);
    }

    ub_resolve_free(res);
}


/* the MX answer */

static void
sg_dns_mx_done(sg_dns_req_t *req, int err, struct ub_result *res)
{
    sg_dns_route_t  *route;
    char             buf[32];

    route = req->route;

    if (err) {
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "MX lookup for %V: %s%Z", &req->name, ub_strerror(err));
        sg_dns_route_fail(req, SG_DNS_TEMPFAIL);
        return;
    }

    if (res->bogus) {
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "MX lookup for %V: DNSSEC validation failed: %s%Z",
                     &req->name,
                     res->why_bogus ? res->why_bogus : "bogus answer");
        sg_dns_route_fail(req, SG_DNS_TEMPFAIL);
        return;
    }

    if (res->rcode == SG_DNS_NXDOMAIN) {
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "MX lookup for %V: NXDOMAIN, the domain does not"
                     " exist%Z", &req->name);
        sg_dns_route_fail(req, SG_DNS_NOT_FOUND);
        return;
    }

    if (res->rcode != 0) {
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "MX lookup for %V: %s%Z", &req->name,
                     sg_dns_rr_rcode(res->rcode, buf, sizeof(buf)));
        sg_dns_route_fail(req, SG_DNS_TEMPFAIL);
        return;
    }

    route->mx_secure = (sg_dns.validating && res->secure) ? 1 : 0;

    if (res->havedata && res->data && res->data[0]) {
        sg_dns_mx_hosts(req, res);
        return;
    }

    /*
     * RFC 5321, 5.1: "If an empty list of MXs is returned, the address is
     * treated as if it was associated with an implicit MX RR, with a
     * preference of 0, pointing to that host."
     */

    route->implicit = 1;

    req->hosts = ngx_pcalloc(req->pool, sizeof(sg_dns_work_t));
    if (req->hosts == NULL) {
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "MX lookup for %V: out of memory%Z", &req->name);
        sg_dns_route_fail(req, SG_DNS_TEMPFAIL);
        return;
    }

    req->nhosts = 1;
    req->hosts[0].name = req->name;

    if (sg_dns_start_host(req, 0) == 0) {
        sg_dns_route_done(req);
    }
}


static void
sg_dns_mx_hosts(sg_dns_req_t *req, struct ub_result *res)
{
    size_t           n, i, nrr, bad, kept;
    sg_dns_rr_mx_t  *mx;
    sg_dns_rr_ip_t   ip;
    sg_dns_work_t   *w;
    ngx_uint_t       started;
    const char      *literal;

    for (nrr = 0; res->data[nrr]; nrr++) { /* void */ }

    if (nrr > SG_DNS_MX_MAX) {
        nrr = SG_DNS_MX_MAX;
    }

    mx = ngx_alloc(nrr * sizeof(sg_dns_rr_mx_t), sg_dns.log);
    if (mx == NULL) {
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "MX lookup for %V: out of memory%Z", &req->name);
        sg_dns_route_fail(req, SG_DNS_TEMPFAIL);
        return;
    }

    n = 0;
    bad = 0;

    for (i = 0; i < nrr; i++) {
        if (res->len[i] < 0 || res->len[i] > SG_DNS_RDATA_MAX
            || sg_dns_rr_mx((unsigned char *) res->data[i],
                            (size_t) res->len[i], &mx[n])
               != 0)
        {
            bad++;
            continue;
        }

        n++;
    }

    if (sg_dns_rr_null_mx(mx, n) && bad == 0) {
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "%V accepts no mail: its MX record is the null MX"
                     " (RFC 7505)%Z", &req->name);
        ngx_free(mx);
        sg_dns_route_fail(req, SG_DNS_NULL_MX);
        return;
    }

    n = sg_dns_rr_mx_order(mx, n, sg_dns_random, NULL);

    if (n == 0) {
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "MX lookup for %V: no MX record names a host%s%Z",
                     &req->name, bad ? " (malformed records)" : "");
        ngx_free(mx);
        sg_dns_route_fail(req, SG_DNS_NOT_FOUND);
        return;
    }

    kept = sg_dns_rr_mx_drop_self(mx, n, (char *) sg_dns.self.data,
                                  sg_dns.self.len);

    if (kept == 0) {
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "the best MX of %V is this host (%V): the mail would"
                     " loop (RFC 5321, 5.1)%Z", &req->name, &sg_dns.self);
        ngx_free(mx);
        sg_dns_route_fail(req, SG_DNS_NOT_FOUND);
        return;
    }

    req->hosts = ngx_pcalloc(req->pool,
                             ngx_min(kept, SG_DNS_MAX_HOSTS)
                             * sizeof(sg_dns_work_t));
    if (req->hosts == NULL) {
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "MX lookup for %V: out of memory%Z", &req->name);
        ngx_free(mx);
        sg_dns_route_fail(req, SG_DNS_TEMPFAIL);
        return;
    }

    literal = NULL;

    for (i = 0; i < kept && req->nhosts < SG_DNS_MAX_HOSTS; i++) {

        /*
         * RFC 1035 3.3.9, RFC 2181 10.3: an MX names a host.  An exchange
         * written as an address ("MX 10 192.0.2.1.") names none: it is
         * skipped, as Postfix and Exim do.
         */

        if (sg_dns_rr_ip_literal(mx[i].name, mx[i].len, &ip) == 0) {
            if (literal == NULL) {
                ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                             "the MX %s of %V is an IP address, not a host"
                             " name%Z", mx[i].name, &req->name);
                literal = (const char *) req->reason;
            }

            continue;
        }

        w = &req->hosts[req->nhosts];

        w->name.data = ngx_pnalloc(req->pool, mx[i].len + 1);
        if (w->name.data == NULL) {
            break;
        }

        ngx_memcpy(w->name.data, mx[i].name, mx[i].len + 1);
        w->name.len = mx[i].len;
        w->pref = mx[i].pref;

        req->nhosts++;
    }

    ngx_free(mx);

    if (req->nhosts == 0) {
        if (literal == NULL) {
            ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                         "MX lookup for %V: out of memory%Z", &req->name);
        }

        sg_dns_route_fail(req, literal ? SG_DNS_NOT_FOUND : SG_DNS_TEMPFAIL);
        return;
    }

    started = 0;

    for (i = 0; i < req->nhosts; i++) {
        started += sg_dns_start_host(req, i);
    }

    if (started == 0) {
        sg_dns_route_done(req);
    }
}


/* an A or AAAA answer */

static void
sg_dns_addr_done(sg_dns_req_t *req, sg_dns_q_t *q, int err,
    struct ub_result *res)
{
    int             family;
    size_t          i;
    sg_dns_work_t  *h;
    sg_dns_rr_ip_t  ip;
    char            buf[SG_DNS_WHY_LEN];

    h = &req->hosts[q->host];
    family = (q->rrtype == SG_DNS_TYPE_A) ? 4 : 6;

    if (err) {
        h->insecure = 1;
        sg_dns_host_failed(req, h, q->rrtype, 1, ub_strerror(err));

    } else if (res->bogus) {
        h->insecure = 1;
        ngx_snprintf((u_char *) buf, sizeof(buf) - 1,
                     "DNSSEC validation failed: %s%Z",
                     res->why_bogus ? res->why_bogus : "bogus answer");
        sg_dns_host_failed(req, h, q->rrtype, 1, buf);

    } else {
        if (!res->secure) {
            h->insecure = 1;
        }

        if (res->rcode == SG_DNS_NXDOMAIN) {
            sg_dns_host_failed(req, h, q->rrtype, 0, "NXDOMAIN");

        } else if (res->rcode != 0) {
            sg_dns_host_failed(req, h, q->rrtype, 1,
                               sg_dns_rr_rcode(res->rcode, buf,
                                               sizeof(buf)));

        } else {
            for (i = 0; res->havedata && res->data && res->data[i]; i++) {

                if (res->len[i] < 0
                    || sg_dns_rr_ip((unsigned char *) res->data[i],
                                    (size_t) res->len[i], family, &ip)
                       != 0)
                {
                    continue;
                }

                if (family == 4 && h->nv4 < SG_DNS_MAX_ADDRS) {
                    h->v4[h->nv4++] = ip;

                } else if (family == 6 && h->nv6 < SG_DNS_MAX_ADDRS) {
                    h->v6[h->nv6++] = ip;
                }
            }
        }
    }

    if (req->running == 0) {
        sg_dns_route_done(req);
    }
}


static void
sg_dns_host_failed(sg_dns_req_t *req, sg_dns_work_t *h, ngx_uint_t rrtype,
    ngx_uint_t tempfail, const char *what)
{
    if (tempfail) {
        h->tempfail = 1;
    }

    /* the first failure, or a temporary one over an NXDOMAIN */

    if (h->why && !(tempfail && !h->why_temp)) {
        return;
    }

    h->why_temp = tempfail ? 1 : 0;

    if (h->why == NULL) {
        h->why = ngx_pnalloc(req->pool, SG_DNS_WHY_LEN);
        if (h->why == NULL) {
            return;
        }
    }

    ngx_snprintf(h->why, SG_DNS_WHY_LEN - 1, "%s lookup: %s%Z",
                 rrtype == SG_DNS_TYPE_A ? "A" : "AAAA", what);
}


/* a raw answer */

static void
sg_dns_raw_done(sg_dns_req_t *req, int err, struct ub_result *res)
{
    u_char           *p;
    size_t            n, len;
    ngx_uint_t        i;
    sg_dns_answer_t  *a;

    a = req->answer;

    if (err || res == NULL) {
        a->rcode = -1;
        sg_dns_finish(req);
        return;
    }

    a->rcode = res->rcode;
    a->havedata = res->havedata ? 1 : 0;
    a->bogus = res->bogus ? 1 : 0;
    a->secure = (sg_dns.validating && res->secure && !res->bogus) ? 1 : 0;

    if (res->bogus) {
        a->why_bogus = "bogus answer";

        if (res->why_bogus) {
            len = ngx_strlen(res->why_bogus);
            p = ngx_pnalloc(req->pool, len + 1);

            if (p) {
                ngx_memcpy(p, res->why_bogus, len + 1);
                a->why_bogus = (const char *) p;
            }
        }
    }

    if (res->canonname) {
        len = ngx_strlen(res->canonname);

        if (len > 1 && res->canonname[len - 1] == '.') {
            len--;
        }

        a->canonname.data = ngx_pnalloc(req->pool, len + 1);
        if (a->canonname.data) {
            ngx_strlow(a->canonname.data, (u_char *) res->canonname, len);
            a->canonname.data[len] = '\0';
            a->canonname.len = len;
        }

    } else {
        /* no CNAME on the way: the name asked */
        a->canonname = req->name;
    }

    for (n = 0; res->havedata && res->data && res->data[n]; n++) {
        /* void */
    }

    if (n) {
        a->rdata = ngx_pcalloc(req->pool, n * sizeof(ngx_str_t));

        for (i = 0; a->rdata && i < n; i++) {
            if (res->len[i] < 0) {
                continue;
            }

            len = (size_t) res->len[i];

            a->rdata[a->nrdata].data = ngx_pnalloc(req->pool, len + 1);
            if (a->rdata[a->nrdata].data == NULL) {
                break;
            }

            ngx_memcpy(a->rdata[a->nrdata].data, res->data[i], len);
            a->rdata[a->nrdata].data[len] = '\0';
            a->rdata[a->nrdata].len = len;
            a->nrdata++;
        }
    }

    sg_dns_finish(req);
}


/* the route, when every address lookup has ended */

static void
sg_dns_route_done(sg_dns_req_t *req)
{
    ngx_uint_t       i, n, tempfail;
    sg_dns_work_t   *w, *why;
    sg_dns_route_t  *route;

    route = req->route;
    n = 0;
    tempfail = 0;

    for (i = 0; i < req->nhosts; i++) {
        if (req->hosts[i].nv4 + req->hosts[i].nv6) {
            n++;
        }

        tempfail |= req->hosts[i].tempfail;
    }

    if (n) {
        route->hosts = ngx_pcalloc(req->pool, n * sizeof(sg_dns_host_t));
        if (route->hosts == NULL) {
            ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                         "address lookup for %V: out of memory%Z",
                         &req->name);
            sg_dns_route_fail(req, SG_DNS_TEMPFAIL);
            return;
        }
    }

    /* the first host that lost something, for the reason */
    why = NULL;

    for (i = 0; i < req->nhosts; i++) {
        w = &req->hosts[i];

        if (why == NULL && (w->tempfail || w->nv4 + w->nv6 == 0)) {
            why = w;
        }

        if (w->nv4 + w->nv6 == 0) {
            /* a host with no address is no route */
            continue;
        }

        if (sg_dns_set_host(req->pool, &route->hosts[route->nhosts], w)
            != NGX_OK)
        {
            ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                         "address lookup for %V: out of memory%Z",
                         &w->name);
            sg_dns_route_fail(req, SG_DNS_TEMPFAIL);
            return;
        }

        route->nhosts++;
    }

    if (route->nhosts) {
        route->status = SG_DNS_OK;

        if (why) {
            ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                         "%V: %s%s%Z", &why->name,
                         (why->nv4 + why->nv6) ? "" : "no address, ",
                         why->why ? (char *) why->why : "no A/AAAA record");
            route->reason = (const char *) req->reason;
        }

        sg_dns_finish(req);
        return;
    }

    /* no host has an address */

    if (tempfail) {
        for (i = 0; i < req->nhosts; i++) {
            if (req->hosts[i].tempfail) {
                why = &req->hosts[i];
                break;
            }
        }

        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "address lookup for %V: %s%Z", &why->name,
                     why->why ? (char *) why->why : "failed");
        sg_dns_route_fail(req, SG_DNS_TEMPFAIL);
        return;
    }

    if (route->implicit) {
        /* RFC 5321, 5.1: "or the implicit MX is unusable" */
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "%V has no MX record and no address (A/AAAA)%Z",
                     &req->name);

    } else if (!req->mx) {
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "host %V has no address (%s)%Z", &req->name,
                     why && why->why ? (char *) why->why
                                     : "no A/AAAA record");

    } else {
        /* RFC 5321, 5.1: "MX records are present, but none [is] usable" */
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "no MX host of %V has an address (%V: %s)%Z",
                     &req->name, &why->name,
                     why->why ? (char *) why->why : "no A/AAAA record");
    }

    sg_dns_route_fail(req, SG_DNS_NOT_FOUND);
}


/* addresses as sockaddrs (port 0): IPv4 first, then IPv6 */

static ngx_int_t
sg_dns_set_host(ngx_pool_t *pool, sg_dns_host_t *host, sg_dns_work_t *w)
{
    size_t                len;
    ngx_uint_t            i, n;
    ngx_addr_t           *a;
    sg_dns_rr_ip_t       *ip;
    struct sockaddr_in   *sin;
#if (NGX_HAVE_INET6)
    struct sockaddr_in6  *sin6;
#endif
    u_char                text[NGX_SOCKADDR_STRLEN];

    n = ngx_min(w->nv4 + w->nv6, SG_DNS_MAX_ADDRS);

    host->name = w->name;
    host->pref = w->pref;
    host->secure = (sg_dns.validating && !w->insecure) ? 1 : 0;
    host->tempfail = w->tempfail;

    host->addrs = ngx_pcalloc(pool, n * sizeof(ngx_addr_t));
    if (host->addrs == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        ip = (i < w->nv4) ? &w->v4[i] : &w->v6[i - w->nv4];
        a = &host->addrs[host->naddrs];

        if (ip->family == 4) {
            sin = ngx_pcalloc(pool, sizeof(struct sockaddr_in));
            if (sin == NULL) {
                return NGX_ERROR;
            }

            sin->sin_family = AF_INET;
            ngx_memcpy(&sin->sin_addr, ip->addr, 4);

            a->sockaddr = (struct sockaddr *) sin;
            a->socklen = sizeof(struct sockaddr_in);

        } else {
#if (NGX_HAVE_INET6)
            sin6 = ngx_pcalloc(pool, sizeof(struct sockaddr_in6));
            if (sin6 == NULL) {
                return NGX_ERROR;
            }

            sin6->sin6_family = AF_INET6;
            ngx_memcpy(&sin6->sin6_addr, ip->addr, 16);

            a->sockaddr = (struct sockaddr *) sin6;
            a->socklen = sizeof(struct sockaddr_in6);
#else
            continue;
#endif
        }

        len = ngx_sock_ntop(a->sockaddr, a->socklen, text, sizeof(text), 0);

        a->name.data = ngx_pnalloc(pool, len + 1);
        if (a->name.data == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(a->name.data, text, len);
        a->name.data[len] = '\0';
        a->name.len = len;

        host->naddrs++;
    }

    return NGX_OK;
}


/* the route ends with no host: the reason is in req->reason */

static void
sg_dns_route_fail(sg_dns_req_t *req, sg_dns_status_e status)
{
    req->route->status = status;
    req->route->reason = (const char *) req->reason;
    req->route->hosts = NULL;
    req->route->nhosts = 0;

    sg_dns_finish(req);
}


static void
sg_dns_timeout_handler(ngx_event_t *ev)
{
    ngx_uint_t     i;
    sg_dns_q_t    *q;
    sg_dns_req_t  *req;
    u_char         what[64];

    req = ev->data;

    ngx_log_debug2(NGX_LOG_DEBUG_CORE, sg_dns.log, 0,
                   "sg dns: %p %V timed out", req, &req->name);

    ngx_snprintf(what, sizeof(what) - 1, "no answer within %M ms%Z",
                 req->timeout);

    if (req->answer) {
        req->answer->rcode = -1;
        sg_dns_finish(req);
        return;
    }

    if (req->mx && req->hosts == NULL) {
        ngx_snprintf(req->reason, SG_DNS_REASON_LEN - 1,
                     "MX lookup for %V: %s%Z", &req->name, what);
        sg_dns_route_fail(req, SG_DNS_TEMPFAIL);
        return;
    }

    /* the addresses found so far are used; the lookups left failed */

    for (i = 0; i < req->nq; i++) {
        q = &req->q[i];

        if (q->running && q->kind == SG_DNS_Q_ADDR) {
            sg_dns_host_failed(req, &req->hosts[q->host], q->rrtype, 1,
                               (char *) what);
        }
    }

    sg_dns_route_done(req);
}


static void
sg_dns_post_handler(ngx_event_t *ev)
{
    sg_dns_req_t  *req;

    req = ev->data;

    if (req->route && req->route->reason == NULL) {
        /* an IP literal: one host, one address */
        sg_dns_route_done(req);
        return;
    }

    sg_dns_finish(req);
}


/* no more answers, no timer: the request is no longer ours to end */

static void
sg_dns_stop(sg_dns_req_t *req)
{
    ngx_uint_t  i;

    for (i = 0; i < req->nq; i++) {
        if (req->q[i].running) {
            (void) ub_cancel(sg_dns.ctx, req->q[i].id);
            req->q[i].running = 0;
        }
    }

    req->running = 0;

    if (req->timer.timer_set) {
        ngx_del_timer(&req->timer);
    }

    if (req->post.posted) {
        ngx_delete_posted_event(&req->post);
    }

    if (req->queue.next) {
        ngx_queue_remove(&req->queue);
        req->queue.next = NULL;
    }
}


static void
sg_dns_finish(sg_dns_req_t *req)
{
    sg_dns_stop(req);

    if (req->route_handler) {
        ngx_log_debug3(NGX_LOG_DEBUG_CORE, sg_dns.log, 0,
                       "sg dns: %p %V: status %d", req, &req->name,
                       (int) req->route->status);

        req->route_handler(req->data, req->route);
        return;
    }

    ngx_log_debug3(NGX_LOG_DEBUG_CORE, sg_dns.log, 0,
                   "sg dns: %p %V: rcode %i", req, &req->name,
                   req->answer->rcode);

    req->answer_handler(req->data, req->answer);
}


static unsigned long
sg_dns_random(void *data, unsigned long n)
{
    return (unsigned long) ngx_random() % n;
}

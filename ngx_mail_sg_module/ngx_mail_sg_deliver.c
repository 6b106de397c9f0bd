/*
 * sg: the delivery engine, in every worker.
 *
 *   claim     due recipients, FOR UPDATE SKIP LOCKED, with a lease that
 *             the worker renews while it works (a dead worker's claims
 *             come back when the lease runs out);
 *   jobs      one per message and destination, queued on the destination;
 *   sessions  up to sg_delivery_destination_concurrency per destination,
 *             sg_delivery_concurrency in all, on the node (all workers:
 *             ngx_mail_sg_node.h); each walks the MX hosts and
 *             their addresses, decides the TLS level per host
 *             (sg_tls_decide), opens a client connection and runs the
 *             destination's jobs over it, one transaction after another;
 *   results   one statement per job: recipients' states, the attempts;
 *   DSNs      one per message once none of its recipients is pending,
 *             queued like any message (RFC 3464).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <jansson.h>
#include <openssl/rand.h>

#include "sg_core.h"
#include "sg_smtp_cmd.h"
#include "sg_lists.h"
#include "sg_dns.h"
#include "sg_dsn.h"
#include "sg_tls_policy.h"
#include "sg_sts.h"
#include "ngx_mail_sg_client.h"
#include "ngx_mail_sg_deliver.h"
#include "ngx_mail_sg_node.h"


#define SG_DLV_FAILURE_KEY      "sg:tls-failure:"
#define SG_DLV_RECORD_RETRY     1000     /* ms between tries to record */
#define SG_DLV_DSN_BATCH        20
#define SG_DLV_CLAIM_BODY_MAX   32768    /* octets: bodies claimed along */
#define SG_DLV_NODE_WAIT        250      /* ms between looks for room on
                                            the node, and between an idle
                                            session's looks for a worker
                                            waiting for its room */


typedef struct sg_dlv_dest_s  sg_dlv_dest_t;
typedef struct sg_dlv_job_s   sg_dlv_job_t;
typedef struct sg_dlv_sess_s  sg_dlv_sess_t;


enum {
    SG_RCPT_PENDING = 0,
    SG_RCPT_DELIVERED,
    SG_RCPT_DEFERRED,
    SG_RCPT_BOUNCED
};


typedef struct {
    int64_t              id;
    ngx_str_t            address;
    ngx_str_t            notify;
    ngx_str_t            orcpt;
    ngx_uint_t           attempts;
    ngx_uint_t           state;              /* SG_RCPT_* */
    const char          *action;             /* RFC 3464 action, final */
    u_char               status[16];
    u_char               reply[SG_DLV_REPLY_MAX];
    ngx_str_t            remote;
    unsigned             dsn_due:1;
} sg_dlv_rcpt_t;


struct sg_dlv_job_s {
    ngx_queue_t          link;               /* dest->jobs */
    ngx_pool_t          *pool;
    sg_dlv_dest_t       *dest;
    u_char               id[17];
    ngx_str_t            sender;
    ngx_str_t            ret;
    ngx_str_t            envid;
    off_t                size;
    time_t               received;
    unsigned             eightbit:1;
    unsigned             smtputf8:1;
    unsigned             requiretls:1;
    unsigned             requiretls_dsn:1;   /* a DSN of a flagged message:
                                                REQUIRETLS when offered */
    unsigned             tls_required_no:1;

    sg_dlv_rcpt_t       *rcpts;
    ngx_uint_t           nrcpts;

    u_char              *body;
    size_t               body_len;

    ngx_queue_t          all;                /* sg_dlv.all_jobs */
    sg_client_txn_t     *sending;            /* the transaction under way */
    unsigned             recording:1;        /* outcomes are final: the
                                                results statement has them */
    unsigned             lapsed:1;           /* its claim may have run out:
                                                it is not sent */
    json_t              *attempts;           /* rows for delivery_attempts */
    sg_client_txn_t     *txn;                /* the transaction an attempt
                                                row is written for, or NULL:
                                                the pending recipients */
    double               started;
    ngx_msec_t           claimed;            /* its claim was sent: the
                                                lease runs from then at
                                                the latest */
    ngx_event_t          retry;              /* recording failed: again */
    ngx_uint_t           retries;
    ngx_queue_t          record;             /* waiting to be recorded */
};


struct sg_dlv_dest_s {
    ngx_str_node_t       sn;                 /* key: sn.str */
    ngx_str_t            domain;             /* recipient domain */
    ngx_str_t            host;               /* relay/internal: the host */
    in_port_t            port;
    unsigned             relay:1;            /* host, not MX of domain */
    unsigned             internal_trusted:1; /* a local domain's server,
                                                trusted for REQUIRETLS */

    ngx_queue_t          jobs;
    ngx_uint_t           njobs;
    ngx_uint_t           sessions;
    ngx_queue_t          idle;               /* sg_dlv_sess_t waiting */

    sg_dns_route_t      *route;
    time_t               route_expires;
    sg_dns_req_t        *dns;

    sg_sts_answer_t     *sts;                /* the MTA-STS answer for the
                                                policy domain, with route */
    sg_sts_req_t        *sts_req;
    time_t               sts_expires;        /* looked up again after */

    ngx_queue_t          waiting;            /* sg_dlv.waiting */
    ngx_uint_t           busy;               /* sg_dlv_dest_run() frames:
                                                not freed meanwhile */
    unsigned             in_waiting:1;
};


struct sg_dlv_sess_s {
    sg_dlv_dest_t       *dest;
    sg_dlv_job_t        *job;
    sg_client_t         *client;             /* open and ready, or NULL */
    sg_tls_decision_t    decision;
    sg_dlv_sess_t       *self;
    ngx_queue_t          link;               /* dest->idle */
    ngx_event_t          idle;
    ngx_msec_t           idle_since;
    ngx_queue_t          idle_all;           /* sg_dlv.idle */

    sg_dns_route_t      *route;              /* the walk's, held: the
                                                destination may have a
                                                newer one */
    ngx_uint_t           host;               /* the MX walk */
    ngx_uint_t           addr;
    double               started;
    ngx_str_t            host_name;
    ngx_addr_t           peer;
    u_char               ip[NGX_SOCKADDR_STRLEN];
    size_t               ip_len;

    u_char               reason[SG_DLV_REPLY_MAX];   /* last host failure */
    u_char               reasons[SG_DLV_REPLY_MAX];  /* every host's, "; " */
    size_t               reasons_len;
    ngx_uint_t           tried;              /* hosts that were tried */
    ngx_uint_t           connects;           /* addresses connected to */
    ngx_uint_t           answered;           /* of them, got an SMTP reply */
    ngx_uint_t           policy_fail;        /* refused by a bounce rule */
    unsigned             clear_retry:1;
    unsigned             limited:1;          /* an MX walk limit stopped
                                                it: hosts were left */
    unsigned             no_requiretls:1;
    unsigned             sts_mismatch:1;     /* H is not in the policy */
    unsigned             kept:1;             /* client used before: the
                                                peer may have closed it */
    unsigned             node_counted:1;     /* sg_node_release() at the
                                                end */
};


typedef struct {
    ngx_str_t            host;
    time_t               expires;
} sg_dlv_failure_t;


typedef struct {
    sg_dlv_conf_t       *conf;
    ngx_log_t           *log;
    ngx_cycle_t         *cycle;
    sg_client_conf_t     client;

    ngx_rbtree_t         dests;
    ngx_rbtree_node_t    sentinel;
    ngx_queue_t          waiting;            /* dests with jobs and room */
    ngx_queue_t          idle;               /* idle sessions, oldest
                                                first */
    unsigned             total_full:1;       /* a destination waits for
                                                room in all */

    ngx_uint_t           sessions;
    ngx_uint_t           jobs;               /* in memory, unfinished */
    size_t               bodies;             /* bytes of bodies held */
    ngx_queue_t          all_jobs;           /* every job in memory */
    ngx_queue_t          body_waiting;       /* sessions waiting for
                                                sg_delivery_memory */

    ngx_event_t          poll;
    ngx_event_t          lease;
    ngx_event_t          node_wait;          /* no room on the node: look
                                                again */
    ngx_msec_t           lease_ok;           /* the last renewal of the
                                                leases that succeeded was
                                                sent */
    ngx_msec_t           claim_sent;         /* the claim under way */
    ngx_connection_t     dummy;
    ngx_connection_t    *quit;               /* "idle": told when a
                                                graceful shutdown starts */
    ngx_socket_t         quit_fd[2];

    ngx_array_t         *failures;           /* sg_dlv_failure_t */
    ngx_pool_t          *failures_pool;

    char                 worker_id[128];
    char                 lease_param[32];

    unsigned             running:1;
    unsigned             claiming:1;
    unsigned             again:1;
    unsigned             dsn_running:1;
    unsigned             dsn_again:1;
    unsigned             released:1;
} sg_dlv_worker_t;


static void *sg_dlv_create_conf(ngx_cycle_t *cycle);
static char *sg_dlv_init_conf(ngx_cycle_t *cycle, void *conf);
static char *sg_dlv_schedule(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t sg_dlv_init_process(ngx_cycle_t *cycle);
static void sg_dlv_exit_process(ngx_cycle_t *cycle);

static void sg_dlv_notify(void *data, const char *channel,
    const char *payload);
static void sg_dlv_failures_notify(void *data, const char *channel,
    const char *payload);
static ngx_int_t sg_dlv_quit_init(ngx_cycle_t *cycle);
static void sg_dlv_quit_handler(ngx_event_t *ev);
static void sg_dlv_poll_handler(ngx_event_t *ev);
static void sg_dlv_lease_handler(ngx_event_t *ev);
static void sg_dlv_lease_done(void *data, PGresult *res, const char *err,
    const char *sqlstate);
static void sg_dlv_claim(void);
static ngx_int_t sg_dlv_claimed_body(sg_dlv_job_t *job, PGresult *res,
    int row, int col);
static void sg_dlv_claimed(void *data, PGresult *res, const char *err,
    const char *sqlstate);
static void sg_dlv_claimed_job(PGresult *res, int *rows, ngx_uint_t nrows,
    sg_dlv_dest_t *dest, int bcol);
static sg_dlv_dest_t *sg_dlv_dest_for(ngx_str_t *domain,
    ngx_uint_t local, ngx_str_t *address);
static void sg_dlv_dest_run(sg_dlv_dest_t *dest);
static void sg_dlv_dest_step(sg_dlv_dest_t *dest);
static void sg_dlv_dest_routed(void *data, sg_dns_route_t *route);
static void sg_dlv_dest_policy(void *data, sg_sts_answer_t *answer);
static ngx_str_t *sg_dlv_policy_domain(sg_dlv_dest_t *dest);
static void sg_dlv_release_at_exit(ngx_cycle_t *cycle);
static u_char *sg_dlv_rcpt_ids(u_char *p, u_char *last, sg_dlv_job_t *job,
    ngx_uint_t pending_only, size_t *n);
static void sg_dlv_sess_not_sent(sg_dlv_sess_t *sess, const char *status,
    const char *reply);
static void sg_dlv_route_release(sg_dlv_dest_t *dest, sg_dns_route_t *route,
    ngx_uint_t used);
static void sg_dlv_dest_lookup_policy(sg_dlv_dest_t *dest);
static void sg_dlv_dest_fail_all(sg_dlv_dest_t *dest, ngx_uint_t bounce,
    const char *status, const char *reply);
static void sg_dlv_dest_free(sg_dlv_dest_t *dest);
static void sg_dlv_run_waiting(void);
static void sg_dlv_sess_idle_close(sg_dlv_sess_t *sess);
static void sg_dlv_sess_unidle(sg_dlv_sess_t *sess);
static void sg_dlv_node_wait_handler(ngx_event_t *ev);
static ngx_uint_t sg_dlv_connections(void);
static void sg_dlv_client_closed(void);

static ngx_int_t sg_dlv_sess_start(sg_dlv_dest_t *dest, sg_dlv_job_t *job,
    ngx_uint_t counted);
static void sg_dlv_sess_drop_client(sg_dlv_sess_t *sess);
static void sg_dlv_sess_job(sg_dlv_sess_t *sess, sg_dlv_job_t *job);
static void sg_dlv_sess_body(sg_dlv_sess_t *sess);
static void sg_dlv_body_loaded(void *data, PGresult *res, const char *err,
    const char *sqlstate);
static void sg_dlv_sess_next_host(sg_dlv_sess_t *sess);
static void sg_dlv_sess_decide(sg_dlv_sess_t *sess);
static void sg_dlv_sess_failure_listed(sg_dlv_sess_t *sess,
    ngx_uint_t listed);
static void sg_dlv_sess_open(sg_dlv_sess_t *sess);
static void sg_dlv_sess_opened(void *data, sg_client_t *c,
    sg_client_info_t *info);
static void sg_dlv_sess_send(sg_dlv_sess_t *sess);
static void sg_dlv_sess_refuse(sg_dlv_sess_t *sess, sg_client_info_t *info,
    ngx_uint_t code, const char *status, const char *reply);
static void sg_dlv_sess_sent(void *data, sg_client_t *c,
    sg_client_txn_t *txn);
static void sg_dlv_sess_exhausted(sg_dlv_sess_t *sess);
static void sg_dlv_sess_note(sg_dlv_sess_t *sess);
static void sg_dlv_sess_done(sg_dlv_sess_t *sess);
static void sg_dlv_sess_idle_handler(ngx_event_t *ev);
static void sg_dlv_sess_close(sg_dlv_sess_t *sess);

static void sg_dlv_attempt(sg_dlv_sess_t *sess, sg_client_info_t *info,
    const char *result, const char *reply);
static void sg_dlv_attempt_policy(sg_dlv_sess_t *sess, json_t *row);
static json_t *sg_dlv_requirements(sg_dlv_sess_t *sess,
    sg_client_info_t *info);
static void sg_dlv_rcpt_reply(sg_dlv_job_t *job, sg_dlv_rcpt_t *r,
    sg_client_reply_t *reply, ngx_str_t *remote, ngx_uint_t dsn_peer);
static void sg_dlv_rcpt_outcome(sg_dlv_job_t *job, sg_dlv_rcpt_t *r,
    ngx_uint_t code, const char *status, const char *text,
    ngx_str_t *remote, ngx_uint_t dsn_peer);
static void sg_dlv_job_finish(sg_dlv_job_t *job);
static void sg_dlv_job_record(sg_dlv_job_t *job);
static void sg_dlv_job_record_alone(sg_dlv_job_t *job);
static ngx_int_t sg_dlv_job_rows(sg_dlv_job_t *job, json_t *rows);
static void sg_dlv_job_span(sg_dlv_job_t *job, int64_t *lo, int64_t *hi);
static void sg_dlv_record_next(void);
static ngx_int_t sg_dlv_record_batch(sg_dlv_job_t **jobs, ngx_uint_t n);
static void sg_dlv_record_batch_done(void *data, PGresult *res,
    const char *err, const char *sqlstate);
static void sg_dlv_job_recorded(void *data, PGresult *res, const char *err,
    const char *sqlstate);
static void sg_dlv_job_retry_later(sg_dlv_job_t *job);
static void sg_dlv_job_retry_handler(ngx_event_t *ev);
static void sg_dlv_job_free(sg_dlv_job_t *job);
static void sg_dlv_release(void);
static void sg_dlv_released(void *data, PGresult *res, const char *err,
    const char *sqlstate);

static void sg_dlv_failure_check(sg_dlv_sess_t *sess);
static void sg_dlv_failure_got(void *data, redisReply *reply,
    const char *err);
static void sg_dlv_failure_add(sg_dlv_sess_t *sess, const char *reason);
static void sg_dlv_failure_set(void *data, redisReply *reply,
    const char *err);
static ngx_uint_t sg_dlv_failure_memory(ngx_str_t *host, ngx_uint_t add,
    time_t expires);

static void sg_dlv_dsn_sweep(void);
static void sg_dlv_dsn_found(void *data, PGresult *res, const char *err,
    const char *sqlstate);
static void sg_dlv_dsn_next(void);
static void sg_dlv_dsn_loaded(void *data, PGresult *res, const char *err,
    const char *sqlstate);
static void sg_dlv_dsn_queued(void *data, PGresult *res, const char *err,
    const char *sqlstate);

static void sg_dlv_printable(u_char *p);
static double sg_dlv_now(void);
static char *sg_dlv_cstr(ngx_pool_t *pool, ngx_str_t *s);
static ngx_int_t sg_dlv_pstr(ngx_pool_t *pool, ngx_str_t *dst,
    const char *src, size_t len);
static ngx_int_t sg_dlv_envid(ngx_pool_t *pool, ngx_str_t *dst,
    const char *src, size_t len);


static ngx_command_t  sg_dlv_commands[] = {

    { ngx_string("sg_delivery"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      0,
      offsetof(sg_dlv_conf_t, enable),
      NULL },

    { ngx_string("sg_delivery_hostname"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      0,
      offsetof(sg_dlv_conf_t, hostname),
      NULL },

    { ngx_string("sg_delivery_concurrency"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      0,
      offsetof(sg_dlv_conf_t, concurrency),
      NULL },

    { ngx_string("sg_delivery_destination_concurrency"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      0,
      offsetof(sg_dlv_conf_t, dest_concurrency),
      NULL },

    { ngx_string("sg_delivery_mx_address_limit"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      0,
      offsetof(sg_dlv_conf_t, mx_address_limit),
      NULL },

    { ngx_string("sg_delivery_mx_session_limit"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      0,
      offsetof(sg_dlv_conf_t, mx_session_limit),
      NULL },

    { ngx_string("sg_delivery_memory"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      0,
      offsetof(sg_dlv_conf_t, memory),
      NULL },

    { ngx_string("sg_delivery_batch"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      0,
      offsetof(sg_dlv_conf_t, batch),
      NULL },

    { ngx_string("sg_delivery_lease"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_dlv_conf_t, lease),
      NULL },

    { ngx_string("sg_delivery_poll"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_dlv_conf_t, poll),
      NULL },

    { ngx_string("sg_delivery_retry_schedule"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_1MORE,
      sg_dlv_schedule,
      0,
      0,
      NULL },

    { ngx_string("sg_delivery_max_lifetime"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      0,
      offsetof(sg_dlv_conf_t, max_lifetime),
      NULL },

    { ngx_string("sg_delivery_delay_notice"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      0,
      offsetof(sg_dlv_conf_t, delay_notice),
      NULL },

    { ngx_string("sg_delivery_connect_timeout"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_dlv_conf_t, connect_timeout),
      NULL },

    { ngx_string("sg_delivery_command_timeout"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_dlv_conf_t, command_timeout),
      NULL },

    { ngx_string("sg_delivery_data_init_timeout"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_dlv_conf_t, data_init_timeout),
      NULL },

    { ngx_string("sg_delivery_data_block_timeout"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_dlv_conf_t, data_block_timeout),
      NULL },

    { ngx_string("sg_delivery_data_done_timeout"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_dlv_conf_t, data_done_timeout),
      NULL },

    { ngx_string("sg_delivery_idle_timeout"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      0,
      offsetof(sg_dlv_conf_t, idle_timeout),
      NULL },

    { ngx_string("sg_delivery_tls_failure_period"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      0,
      offsetof(sg_dlv_conf_t, tls_failure_period),
      NULL },

    { ngx_string("sg_delivery_port"),
      NGX_MAIN_CONF|NGX_DIRECT_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      0,
      offsetof(sg_dlv_conf_t, port),
      NULL },

      ngx_null_command
};


static ngx_core_module_t  sg_dlv_module_ctx = {
    ngx_string("sg_deliver"),
    sg_dlv_create_conf,
    sg_dlv_init_conf
};


ngx_module_t  ngx_sg_deliver_module = {
    NGX_MODULE_V1,
    &sg_dlv_module_ctx,                    /* module context */
    sg_dlv_commands,                       /* module directives */
    NGX_CORE_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    sg_dlv_init_process,                   /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    sg_dlv_exit_process,                   /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static sg_dlv_worker_t  sg_dlv;


/*
 * Claim: due recipients, oldest first, with their message's envelope, and
 * the body of a small message on the first row of each message and
 * domain (a job): one statement instead of one per job; a larger body is
 * loaded when its session starts (sg_dlv_sess_body), so that a claim
 * holds at most batch * SG_DLV_CLAIM_BODY_MAX octets of bodies.
 * $1 batch, $2 worker id, $3 lease (seconds).
 */
#define SG_DLV_CLAIM_SQL                                                     \
    "WITH due AS (SELECT id FROM recipients"                                 \
    "  WHERE state IN ('queued', 'deferred') AND next_attempt_at <= now()"   \
    "  ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED),"           \
    " c AS (UPDATE recipients r SET state = 'delivering', claimed_by = $2,"        \
    "  lease_until = now() + $3 * interval '1 second',"                      \
    "  attempts = r.attempts + 1"                                            \
    " FROM due, messages m WHERE r.id = due.id AND m.id = r.message_id"      \
    " RETURNING r.id, r.message_id, r.address, r.domain, r.local_domain,"    \
    "  coalesce(r.dsn_notify, '') AS notify,"                                \
    "  coalesce(r.dsn_orcpt, '') AS orcpt, r.attempts,"                      \
    "  m.sender, m.size, m.body_type, m.smtputf8,"                           \
    "  coalesce(m.dsn_ret, '') AS ret, coalesce(m.dsn_envid, '') AS envid,"  \
    "  m.requiretls, m.tls_required_no,"                                     \
    "  extract(epoch FROM m.received_at)::bigint AS received,"               \
    "  'dsn' = ANY(m.requiretls_sources) AS requiretls_dsn)"                 \
    " SELECT c.*, CASE WHEN c.size <= " ngx_value(SG_DLV_CLAIM_BODY_MAX)      \
    "  AND row_number() OVER (PARTITION BY c.message_id, c.domain"           \
    "   ORDER BY c.id) = 1"                                                  \
    "  THEN (SELECT b.body FROM messages b WHERE b.id = c.message_id)"       \
    "  END AS body"                                                          \
    " FROM c ORDER BY message_id, domain, id"

#define SG_DLV_LEASE_SQL                                                     \
    "WITH mine AS (UPDATE recipients SET"                                    \
    "  lease_until = now() + $2 * interval '1 second'"                       \
    "  WHERE state = 'delivering' AND claimed_by = $1 RETURNING id),"        \
    " lost AS (UPDATE recipients SET state = 'deferred', claimed_by = NULL," \
    "  lease_until = NULL, next_attempt_at = now()"                          \
    "  WHERE state = 'delivering' AND lease_until < now()"                   \
    "  AND claimed_by IS DISTINCT FROM $1 RETURNING id)"                     \
    " SELECT (SELECT count(*) FROM mine), (SELECT count(*) FROM lost)"

#define SG_DLV_BODY_SQL                                                      \
    "SELECT body FROM messages WHERE id = $1"

/*
 * The results of one or several jobs in one statement and one commit: $1
 * the recipients of all, $2 worker, $3 the message ids (text[]), $4 the
 * attempt rows of all (each with its message_id), $5 and $6 the smallest
 * and largest recipient id (the jobs of a batch are chosen so that the
 * range stays short, SG_DLV_RECORD_SPAN).  It returns the messages whose
 * recipients were still claimed by this worker.
 *
 * json_to_recordset() is estimated at 100 rows: without the range, or with
 * "state = 'delivering'" in the WHERE (which makes the partial index
 * recipients_lease usable), the planner read every recipient being
 * delivered instead of these few through the primary key; and "id =
 * ANY(ids)" made the cached generic plan, when built while the table was
 * small, a sequential scan for good.  A range of the primary key is an
 * index scan in every case.  claimed_by = $2 implies state = 'delivering'
 * (sql/010_queue_performance.sql, recipients_claim_delivering).
 */
#define SG_DLV_RECORD_SQL                                                    \
    "WITH r AS (SELECT * FROM json_to_recordset($1::json) AS x(id bigint,"   \
    "  state text, reply text, status text, action text, remote text,"       \
    "  retry_in double precision, dsn_due boolean)),"                        \
    " u AS (UPDATE recipients t SET state = r.state, last_reply = r.reply,"  \
    "  claimed_by = NULL, lease_until = NULL,"                               \
    "  next_attempt_at = CASE WHEN r.state = 'deferred'"                     \
    "   THEN now() + r.retry_in * interval '1 second'"                       \
    "   ELSE t.next_attempt_at END,"                                         \
    "  final_at = CASE WHEN r.state = 'deferred' THEN NULL ELSE now() END,"  \
    "  dsn_status = r.status, dsn_action = r.action,"                        \
    "  dsn_remote_mta = r.remote, dsn_due = r.dsn_due"                       \
    "  FROM r WHERE t.id BETWEEN $5::bigint AND $6::bigint AND t.id = r.id"  \
    "  AND t.claimed_by = $2 RETURNING t.message_id),"                               \
    " a AS (INSERT INTO delivery_attempts (message_id, recipients,"          \
    "  started_at, ended_at, destination, mx_host, ip, port, tls_level,"     \
    "  tls_rule, tls_reason, starttls, tls_protocol, tls_cipher,"            \
    "  tls_verify, tls_host_match, tls_result_type, result, reply, worker,"  \
    "  policy_type, policy_domain, policy_id, policy_mode, policy_text,"     \
    "  policy_result_type, policy_reason, requirements)"                     \
    "  SELECT x.message_id, x.recipients, to_timestamp(x.started),"          \
    "  to_timestamp(x.ended), x.destination, x.mx_host, x.ip::inet, x.port," \
    "  x.tls_level, x.tls_rule, x.tls_reason, x.starttls, x.tls_protocol,"   \
    "  x.tls_cipher, x.tls_verify, x.tls_host_match, x.tls_result_type,"     \
    "  x.result, x.reply, $2, x.policy_type, x.policy_domain, x.policy_id,"  \
    "  x.policy_mode, x.policy_text, x.policy_result_type, x.policy_reason," \
    "  x.requirements"                                                       \
    "  FROM json_to_recordset($4::json) AS x(message_id text,"               \
    "  recipients text[],"                                                   \
    "  started double precision, ended double precision, destination text,"  \
    "  mx_host text, ip text, port integer, tls_level text,"                 \
    "  tls_rule integer, tls_reason text, starttls boolean,"                 \
    "  tls_protocol text, tls_cipher text, tls_verify text,"                 \
    "  tls_host_match boolean, tls_result_type text, result text,"           \
    "  reply text, policy_type text, policy_domain text, policy_id text,"    \
    "  policy_mode text, policy_text text, policy_result_type text,"         \
    "  policy_reason text, requirements jsonb)),"                            \
    " m AS (UPDATE messages SET last_attempt_at = now()"                     \
    "  WHERE id = ANY($3::text[]))"                                          \
    " SELECT DISTINCT message_id FROM u"

/* results statements running per worker; jobs done meanwhile wait */
#define SG_DLV_RECORD_RUNNING   1
#define SG_DLV_RECORD_BATCH     64       /* jobs per results statement */
#define SG_DLV_RECORD_SPAN      4096     /* largest - smallest id in one */

#define SG_DLV_RELEASE_SQL                                                   \
    "UPDATE recipients SET state = 'deferred', claimed_by = NULL,"           \
    " lease_until = NULL, next_attempt_at = now()"                           \
    " WHERE id = ANY($1::bigint[]) AND state = 'delivering'"                 \
    " AND claimed_by = $2"

/* the hot statements are prepared once per PostgreSQL connection */
static sg_pg_stmt_t  sg_dlv_claim_stmt =
    SG_PG_STMT("sg_dlv_claim", SG_DLV_CLAIM_SQL);
static sg_pg_stmt_t  sg_dlv_lease_stmt =
    SG_PG_STMT("sg_dlv_lease", SG_DLV_LEASE_SQL);
static sg_pg_stmt_t  sg_dlv_body_stmt =
    SG_PG_STMT("sg_dlv_body", SG_DLV_BODY_SQL);
static sg_pg_stmt_t  sg_dlv_record_stmt =
    SG_PG_STMT("sg_dlv_record", SG_DLV_RECORD_SQL);
static sg_pg_stmt_t  sg_dlv_release_stmt =
    SG_PG_STMT("sg_dlv_release", SG_DLV_RELEASE_SQL);

/*
 * Messages with a DSN due: a final outcome to report and nothing pending,
 * or a delay to report ($1: the delay-notice age in seconds).
 */
#define SG_DLV_DSN_FIND_SQL                                                  \
    "SELECT DISTINCT r.message_id FROM recipients r"                         \
    " WHERE (r.dsn_due AND NOT EXISTS (SELECT 1 FROM recipients p"           \
    "   WHERE p.message_id = r.message_id"                                   \
    "   AND p.state IN ('queued', 'deferred', 'delivering')))"               \
    " OR (r.state = 'deferred' AND NOT r.delay_notified"                     \
    "   AND r.dsn_notify LIKE '%DELAY%' AND EXISTS (SELECT 1 FROM messages m"\
    "   WHERE m.id = r.message_id AND m.sender <> ''"                        \
    "   AND m.received_at < now() - $1 * interval '1 second'))"              \
    " LIMIT " ngx_value(SG_DLV_DSN_BATCH)

/*
 * A DSN returns at most 64 KiB of the original's body, so only the first
 * octets of the original are read: enough for a header section of 1 MiB
 * (sg_smtp_max_header_size is 64k by default) and that much body.
 */
#define SG_DLV_DSN_RETURN_MAX    65536
#define SG_DLV_DSN_ORIGINAL_MAX  (1024 * 1024 + SG_DLV_DSN_RETURN_MAX + 2)

#define SG_DLV_DSN_LOAD_SQL                                                  \
    "SELECT m.sender, coalesce(m.dsn_ret, ''), coalesce(m.dsn_envid, ''),"   \
    " m.requiretls, extract(epoch FROM m.received_at)::bigint,"              \
    " substring(m.body FROM 1 FOR $4::integer),"                             \
    " (SELECT coalesce(json_agg(json_build_object('id', r.id,"               \
    "   'address', r.address, 'notify', r.dsn_notify, 'orcpt', r.dsn_orcpt," \
    "   'action', CASE WHEN r.dsn_due THEN r.dsn_action ELSE 'delayed' END,"\
    "   'status', coalesce(r.dsn_status, '4.0.0'), 'remote',"                \
    "   r.dsn_remote_mta, 'reply', r.last_reply, 'when',"                    \
    "   extract(epoch FROM coalesce(r.final_at, now()))::bigint,"            \
    "   'until', extract(epoch FROM m.received_at)::bigint + $2)), '[]')"    \
    "   FROM recipients r WHERE r.message_id = m.id AND (r.dsn_due"          \
    "   AND NOT EXISTS (SELECT 1 FROM recipients p"                          \
    "    WHERE p.message_id = m.id"                                          \
    "    AND p.state IN ('queued', 'deferred', 'delivering'))"               \
    "   OR (r.state = 'deferred' AND NOT r.delay_notified"                   \
    "    AND r.dsn_notify LIKE '%DELAY%'"                                    \
    "    AND m.received_at < now() - $3 * interval '1 second')))::text"      \
    ", octet_length(m.body) FROM messages m WHERE m.id = $1"

/*
 * Queue a DSN: the reported recipients are marked first and the DSN is
 * inserted only if all of them were still unmarked (another worker may
 * have reported them): one statement, all or nothing.
 */
#define SG_DLV_DSN_QUEUE_SQL                                                 \
    "WITH c AS (UPDATE recipients SET"                                       \
    "  dsn_due = CASE WHEN id = ANY($2::bigint[]) THEN false ELSE dsn_due END,"\
    "  delay_notified = CASE WHEN id = ANY($3::bigint[]) THEN true"          \
    "   ELSE delay_notified END"                                             \
    "  WHERE (id = ANY($2::bigint[]) AND dsn_due)"                           \
    "  OR (id = ANY($3::bigint[]) AND NOT delay_notified) RETURNING id),"    \
    " m AS (INSERT INTO messages (id, sender, size, body, body_type,"        \
    "  requiretls, requiretls_sources, client_ip, helo, esmtp, dsn_of)"      \
    "  SELECT $4, '', $5::bigint, $6::bytea, $7, false,"                     \
    "  CASE WHEN $8::boolean THEN ARRAY['dsn'] ELSE '{}'::text[] END,"       \
    "  NULL, $9, true, $1"                                                   \
    "  WHERE (SELECT count(*) FROM c) = $10::integer AND $10::integer > 0"   \
    "  RETURNING id)"                                                        \
    " INSERT INTO recipients (message_id, address, original_address,"        \
    "  domain, local_domain)"                                                \
    " SELECT m.id, $11, $11, $12, $13::boolean FROM m RETURNING message_id"


static void *
sg_dlv_create_conf(ngx_cycle_t *cycle)
{
    sg_dlv_conf_t  *conf;

    conf = ngx_pcalloc(cycle->pool, sizeof(sg_dlv_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->enable = NGX_CONF_UNSET;
    conf->concurrency = NGX_CONF_UNSET_UINT;
    conf->dest_concurrency = NGX_CONF_UNSET_UINT;
    conf->mx_address_limit = NGX_CONF_UNSET_UINT;
    conf->mx_session_limit = NGX_CONF_UNSET_UINT;
    conf->memory = NGX_CONF_UNSET_SIZE;
    conf->batch = NGX_CONF_UNSET_UINT;
    conf->lease = NGX_CONF_UNSET_MSEC;
    conf->poll = NGX_CONF_UNSET_MSEC;
    conf->max_lifetime = NGX_CONF_UNSET;
    conf->delay_notice = NGX_CONF_UNSET;
    conf->connect_timeout = NGX_CONF_UNSET_MSEC;
    conf->command_timeout = NGX_CONF_UNSET_MSEC;
    conf->data_init_timeout = NGX_CONF_UNSET_MSEC;
    conf->data_block_timeout = NGX_CONF_UNSET_MSEC;
    conf->data_done_timeout = NGX_CONF_UNSET_MSEC;
    conf->idle_timeout = NGX_CONF_UNSET_MSEC;
    conf->tls_failure_period = NGX_CONF_UNSET;
    conf->port = NGX_CONF_UNSET_UINT;

    return conf;
}


static char *
sg_dlv_init_conf(ngx_cycle_t *cycle, void *conf)
{
    sg_dlv_conf_t  *dcf = conf;

    static time_t  schedule[] = { 300, 600, 1200, 2400, 3600 };

    ngx_conf_init_value(dcf->enable, 1);
    ngx_conf_init_uint_value(dcf->concurrency, 100);
    ngx_conf_init_uint_value(dcf->dest_concurrency, 20);
    ngx_conf_init_uint_value(dcf->batch, 200);
    ngx_conf_init_uint_value(dcf->mx_address_limit, 10);
    ngx_conf_init_uint_value(dcf->mx_session_limit, 4);
    ngx_conf_init_size_value(dcf->memory, 256 * 1024 * 1024);
    /* RFC 5321, 4.5.3.2: the client's timeouts */
    ngx_conf_init_msec_value(dcf->connect_timeout, 30000);
    ngx_conf_init_msec_value(dcf->command_timeout, 300000);
    ngx_conf_init_msec_value(dcf->data_init_timeout, 120000);
    ngx_conf_init_msec_value(dcf->data_block_timeout, 180000);
    ngx_conf_init_msec_value(dcf->data_done_timeout, 600000);
    ngx_conf_init_msec_value(dcf->idle_timeout, 5000);
    ngx_conf_init_msec_value(dcf->lease, 300000);
    ngx_conf_init_msec_value(dcf->poll, 10000);
    ngx_conf_init_value(dcf->max_lifetime, 5 * 86400);
    ngx_conf_init_value(dcf->delay_notice, 4 * 3600);
    ngx_conf_init_value(dcf->tls_failure_period, 3600);
    ngx_conf_init_uint_value(dcf->port, 25);

    if (dcf->nschedule == 0) {
        ngx_memcpy(dcf->schedule, schedule, sizeof(schedule));
        dcf->nschedule = sizeof(schedule) / sizeof(schedule[0]);
    }

    if (dcf->hostname.len == 0) {
        dcf->hostname = cycle->hostname;
    }

    if (dcf->concurrency < 1 || dcf->concurrency > SG_DLV_MAX_CONCURRENCY
        || dcf->dest_concurrency < 1
        || dcf->dest_concurrency > SG_DLV_MAX_CONCURRENCY
        || dcf->batch < 1 || dcf->batch > 10000)
    {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "\"sg_delivery_concurrency\" and"
                      " \"sg_delivery_destination_concurrency\" must be from"
                      " 1 to %d, \"sg_delivery_batch\" from 1 to 10000",
                      SG_DLV_MAX_CONCURRENCY);
        return NGX_CONF_ERROR;
    }

    if (dcf->mx_address_limit < 1 || dcf->mx_address_limit > 100
        || dcf->mx_session_limit < 1 || dcf->mx_session_limit > 100)
    {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "\"sg_delivery_mx_address_limit\" and"
                      " \"sg_delivery_mx_session_limit\" must be from 1"
                      " to 100");
        return NGX_CONF_ERROR;
    }

    if (dcf->memory < 1024 * 1024) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "\"sg_delivery_memory\" must be at least 1m");
        return NGX_CONF_ERROR;
    }

    if (dcf->lease < 3000) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "\"sg_delivery_lease\" must be at least 3s");
        return NGX_CONF_ERROR;
    }

    if (dcf->port < 1 || dcf->port > 65535) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "\"sg_delivery_port\" must be from 1 to 65535");
        return NGX_CONF_ERROR;
    }

    if (dcf->tls_failure_period < 1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "\"sg_delivery_tls_failure_period\" must be at"
                      " least 1s");
        return NGX_CONF_ERROR;
    }

    if (dcf->enable) {
        dcf->node_zone = sg_node_zone_add(cycle, dcf->concurrency);
        if (dcf->node_zone == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


/* sg_delivery_retry_schedule 5m 10m 20m 40m 1h;  (the last step repeats) */

static char *
sg_dlv_schedule(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    sg_dlv_conf_t  *dcf = conf;

    time_t       t;
    ngx_str_t   *value;
    ngx_uint_t   i;

    if (dcf->nschedule) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (cf->args->nelts - 1 > SG_DLV_MAX_SCHEDULE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "at most %d steps", SG_DLV_MAX_SCHEDULE);
        return NGX_CONF_ERROR;
    }

    for (i = 1; i < cf->args->nelts; i++) {
        t = ngx_parse_time(&value[i], 1);

        if (t == (time_t) NGX_ERROR || t < 1) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid retry interval \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }

        dcf->schedule[dcf->nschedule++] = t;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
sg_dlv_init_process(ngx_cycle_t *cycle)
{
    sg_dlv_conf_t   *dcf;
    sg_core_conf_t  *scf;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    ngx_memzero(&sg_dlv, sizeof(sg_dlv_worker_t));

    dcf = (sg_dlv_conf_t *) ngx_get_conf(cycle->conf_ctx,
                                         ngx_sg_deliver_module);
    scf = sg_core_conf(cycle);

    if (dcf == NULL || !dcf->enable || sg_worker.pg == NULL) {
        return NGX_OK;
    }

    sg_dlv.conf = dcf;
    sg_dlv.log = cycle->log;
    sg_dlv.cycle = cycle;

    sg_dlv.client.helo_name = dcf->hostname;
    sg_dlv.client.connect_timeout = dcf->connect_timeout;
    sg_dlv.client.command_timeout = dcf->command_timeout;
    sg_dlv.client.data_init_timeout = dcf->data_init_timeout;
    sg_dlv.client.data_block_timeout = dcf->data_block_timeout;
    sg_dlv.client.data_done_timeout = dcf->data_done_timeout;
    sg_dlv.client.log = cycle->log;
    sg_dlv.client.closed = sg_dlv_client_closed;

    sg_dlv.client.ssl = sg_client_ssl_create(cycle, &scf->trusted_ca);
    if (sg_dlv.client.ssl == NULL) {
        return NGX_ERROR;
    }

    ngx_rbtree_init(&sg_dlv.dests, &sg_dlv.sentinel,
                    ngx_str_rbtree_insert_value);
    ngx_queue_init(&sg_dlv.waiting);
    ngx_queue_init(&sg_dlv.idle);
    ngx_queue_init(&sg_dlv.body_waiting);
    ngx_queue_init(&sg_dlv.all_jobs);

    sg_dlv.failures_pool = ngx_create_pool(1024, cycle->log);
    if (sg_dlv.failures_pool == NULL) {
        return NGX_ERROR;
    }

    sg_dlv.failures = ngx_array_create(sg_dlv.failures_pool, 8,
                                       sizeof(sg_dlv_failure_t));
    if (sg_dlv.failures == NULL) {
        return NGX_ERROR;
    }

    ngx_snprintf((u_char *) sg_dlv.worker_id, sizeof(sg_dlv.worker_id) - 1,
                 "%V:%P:%T%Z", &cycle->hostname, ngx_pid, ngx_time());
    ngx_snprintf((u_char *) sg_dlv.lease_param,
                 sizeof(sg_dlv.lease_param) - 1, "%M%Z",
                 dcf->lease / 1000);

    if (sg_pg_listen(sg_worker.pg, "sg_queue", sg_dlv_notify, NULL)
        != NGX_OK
        || sg_pg_listen(sg_worker.pg, "sg_tls_failures",
                        sg_dlv_failures_notify, NULL)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    sg_dlv.dummy.fd = (ngx_socket_t) -1;

    sg_dlv.poll.handler = sg_dlv_poll_handler;
    sg_dlv.poll.data = &sg_dlv.dummy;
    sg_dlv.poll.log = cycle->log;
    sg_dlv.poll.cancelable = 1;

    sg_dlv.lease.handler = sg_dlv_lease_handler;
    sg_dlv.lease.data = &sg_dlv.dummy;
    sg_dlv.lease.log = cycle->log;
    sg_dlv.lease.cancelable = 1;

    sg_dlv.node_wait.handler = sg_dlv_node_wait_handler;
    sg_dlv.node_wait.data = &sg_dlv.dummy;
    sg_dlv.node_wait.log = cycle->log;
    sg_dlv.node_wait.cancelable = 1;

    sg_node_init_process(dcf->node_zone, cycle->log);

    if (sg_dlv_quit_init(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    sg_dlv.running = 1;

    /* the first claim once settings and lists are in */
    ngx_add_timer(&sg_dlv.poll, 200);
    ngx_add_timer(&sg_dlv.lease, dcf->lease / 3);

    return NGX_OK;
}


static void
sg_dlv_exit_process(ngx_cycle_t *cycle)
{
    sg_dlv.running = 0;

    if (sg_dlv.quit) {
        ngx_close_connection(sg_dlv.quit);
        sg_dlv.quit = NULL;
        (void) ngx_close_socket(sg_dlv.quit_fd[1]);
    }

    /* a fast stop: the claims not used go back now, not at lease end */
    sg_dlv_release_at_exit(cycle);

    /* connections still open (idle, saying QUIT) are closed now */
    sg_client_abort_all();

    /* and no longer count on the node */
    sg_node_exit_process();

    if (sg_dlv.failures_pool) {
        ngx_destroy_pool(sg_dlv.failures_pool);
        sg_dlv.failures_pool = NULL;
    }

    if (sg_dlv.client.ssl) {
        ngx_ssl_cleanup_ctx(sg_dlv.client.ssl);
        sg_dlv.client.ssl = NULL;
    }
}


/*
 * The worker exits at once (nginx -s stop, SIGTERM; a graceful stop gets
 * here with no job left): recipients it claimed and has not sent go back
 * to the queue now instead of when their lease runs out.  Not those of a
 * transaction whose final "." was sent (the reply may have been a 250:
 * the lease decides, docs/design.md "Delivered twice"), nor results
 * already decided.  The event loop is over: one short blocking statement
 * on a connection of its own, bounded by connect and statement timeouts
 * (nginx's master kills a worker that takes more than about a second).
 */

/*
 * The ids of a job's recipients (those not sent yet only, or all) added
 * to a bigint[] literal being written; *n counts the ids written so far.
 */

static u_char *
sg_dlv_rcpt_ids(u_char *p, u_char *last, sg_dlv_job_t *job,
    ngx_uint_t pending_only, size_t *n)
{
    ngx_uint_t  i;

    for (i = 0; i < job->nrcpts; i++) {
        if (pending_only && job->rcpts[i].state != SG_RCPT_PENDING) {
            continue;
        }

        p = ngx_slprintf(p, last, "%s%L", *n ? "," : "", job->rcpts[i].id);
        (*n)++;
    }

    return p;
}


static void
sg_dlv_release_at_exit(ngx_cycle_t *cycle)
{
    u_char          *ids, *p, *last;
    size_t           n;
    PGconn          *conn;
    PGresult        *res;
    ngx_queue_t     *q;
    sg_dlv_job_t    *job;
    sg_core_conf_t  *scf;
    const char      *params[2], *err;
    u_char           conninfo[1024];

    static const char  *keys[] = { "dbname", "connect_timeout", "options",
                                   NULL };
    const char         *values[4];

    if (sg_dlv.all_jobs.next == NULL) {
        /* delivery never started in this worker */
        return;
    }

    n = 0;

    for (q = ngx_queue_head(&sg_dlv.all_jobs);
         q != ngx_queue_sentinel(&sg_dlv.all_jobs);
         q = ngx_queue_next(q))
    {
        job = ngx_queue_data(q, sg_dlv_job_t, all);
        n += job->nrcpts;
    }

    scf = sg_core_conf(cycle);

    if (n == 0 || scf == NULL
        || scf->pg_conninfo.len >= sizeof(conninfo))
    {
        return;
    }

    ids = ngx_alloc(n * (NGX_INT64_LEN + 1) + 3, cycle->log);
    if (ids == NULL) {
        return;
    }

    p = ids;
    last = ids + n * (NGX_INT64_LEN + 1) + 3;
    *p++ = '{';
    n = 0;

    for (q = ngx_queue_head(&sg_dlv.all_jobs);
         q != ngx_queue_sentinel(&sg_dlv.all_jobs);
         q = ngx_queue_next(q))
    {
        job = ngx_queue_data(q, sg_dlv_job_t, all);

        if (job->recording || (job->sending && job->sending->data_sent)) {
            continue;
        }

        p = sg_dlv_rcpt_ids(p, last, job, 1, &n);
    }

    p = ngx_slprintf(p, last, "}%Z");

    if (n == 0) {
        ngx_free(ids);
        return;
    }

    ngx_cpystrn(conninfo, scf->pg_conninfo.data, scf->pg_conninfo.len + 1);

    values[0] = (const char *) conninfo;
    values[1] = "2";
    values[2] = "-c statement_timeout=1000";
    values[3] = NULL;

    conn = PQconnectdbParams(keys, values, 1);
    res = NULL;

    if (PQstatus(conn) != CONNECTION_OK) {
        err = PQerrorMessage(conn);

    } else {
        params[0] = (const char *) ids;
        params[1] = sg_dlv.worker_id;

        res = PQexecParams(conn, SG_DLV_RELEASE_SQL, 2, NULL, params, NULL,
                           NULL, 0);
        err = (PQresultStatus(res) == PGRES_COMMAND_OK)
              ? NULL : PQresultErrorMessage(res);
    }

    if (err == NULL) {
        ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                      "sg delivery: stopping: %s of %uz recipients not sent"
                      " went back to the queue", PQcmdTuples(res), n);

    } else {
        ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                      "sg delivery: stopping: %uz recipients not sent come"
                      " back when their claim runs out (PostgreSQL: %s)",
                      n, err);
    }

    PQclear(res);
    PQfinish(conn);
    ngx_free(ids);
}


/* NOTIFY sg_queue: new mail, a retry from the API; NULL: LISTEN is back */

static void
sg_dlv_notify(void *data, const char *channel, const char *payload)
{
    sg_dlv_claim();

    /*
     * new mail (payload "") needs no DSN search; an API change ("api":
     * a delete with a bounce) and a LISTEN that is back (NULL) may
     */
    if (payload == NULL || payload[0] != '\0') {
        sg_dlv_dsn_sweep();
    }
}


/* NOTIFY sg_tls_failures <host>: an admin removed the host from the list */

static void
sg_dlv_failures_notify(void *data, const char *channel, const char *payload)
{
    ngx_str_t          host;
    ngx_uint_t         i;
    sg_dlv_failure_t  *f;

    if (payload == NULL) {
        return;
    }

    host.data = (u_char *) payload;
    host.len = ngx_strlen(payload);

    f = sg_dlv.failures->elts;

    for (i = 0; i < sg_dlv.failures->nelts; i++) {
        if (f[i].host.len == host.len
            && ngx_strncasecmp(f[i].host.data, host.data, host.len) == 0)
        {
            f[i].expires = 0;
        }
    }
}


/*
 * A graceful shutdown (SIGQUIT, a reload) closes the worker's idle
 * connections at once (ngx_close_idle_connections()): one of a pipe that
 * nothing is written to stands for this module, so that the jobs not
 * started go back to the queue at once, not at the next poll.
 */

static ngx_int_t
sg_dlv_quit_init(ngx_cycle_t *cycle)
{
    ngx_connection_t  *c;

    if (pipe(sg_dlv.quit_fd) == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "sg delivery: pipe() failed");
        return NGX_ERROR;
    }

    c = ngx_get_connection(sg_dlv.quit_fd[0], cycle->log);
    if (c == NULL) {
        (void) ngx_close_socket(sg_dlv.quit_fd[0]);
        (void) ngx_close_socket(sg_dlv.quit_fd[1]);
        return NGX_ERROR;
    }

    c->idle = 1;
    c->read->handler = sg_dlv_quit_handler;
    c->read->log = cycle->log;
    c->write->log = cycle->log;

    sg_dlv.quit = c;

    return NGX_OK;
}


static void
sg_dlv_quit_handler(ngx_event_t *ev)
{
    ngx_connection_t  *c;

    c = ev->data;

    if (!c->close) {
        return;
    }

    sg_dlv.quit = NULL;
    ngx_close_connection(c);
    (void) ngx_close_socket(sg_dlv.quit_fd[1]);

    if (ngx_exiting) {
        sg_dlv_release();
    }
}


static void
sg_dlv_poll_handler(ngx_event_t *ev)
{
    if (ngx_exiting) {
        sg_dlv_release();
        return;
    }

    if (!sg_dlv.running || ngx_terminate) {
        return;
    }

    if (sg_lists_current() == NULL || !sg_worker.settings_loaded) {
        /*
         * the first claim waits for the settings and lists, soon: the
         * poll may be long (recipients handed back by a worker that
         * stopped are due now)
         */
        ngx_add_timer(&sg_dlv.poll, 200);
        return;
    }

    sg_dlv_claim();
    sg_dlv_dsn_sweep();

    ngx_add_timer(&sg_dlv.poll, sg_dlv.conf->poll);
}


/* renew this worker's leases; release the leases nobody renewed */

static void
sg_dlv_lease_handler(ngx_event_t *ev)
{
    const char  *params[2];

    /*
     * shutting down, transactions still finish: their claims must not run
     * out meanwhile, or another worker would send them again
     */
    if (!sg_dlv.running || ngx_terminate || (ngx_exiting && sg_dlv.jobs == 0))
    {
        return;
    }

    /* a worker that died does not hold room on the node for long */
    sg_node_sweep();

    params[0] = sg_dlv.worker_id;
    params[1] = sg_dlv.lease_param;

    /* the lease runs from when the statement is sent, at the latest */
    (void) sg_pg_exec(sg_worker.pg, &sg_dlv_lease_stmt, 2, params,
                      sg_dlv_lease_done,
                      (void *) (uintptr_t) ngx_current_msec);

    ngx_add_timer(&sg_dlv.lease, sg_dlv.conf->lease / 3);
}


static void
sg_dlv_lease_done(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    ngx_msec_t     sent, since;
    ngx_queue_t   *q;
    sg_dlv_job_t  *job;

    if (err) {
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: cannot renew leases: %s", err);
        return;
    }

    sent = (ngx_msec_t) (uintptr_t) data;

    /*
     * A claim lasts at least a lease from when the claim or a renewal that
     * succeeded was sent (since).  This renewal ran at the latest now (it
     * may have waited for PostgreSQL): a job whose claim was not renewed
     * within a lease before now may have run out meanwhile, and another
     * worker may have released and claimed its recipients.  It is not
     * sent (its recipients are tried again at once).  docs/design.md,
     * "Delivered twice".
     */
    for (q = ngx_queue_head(&sg_dlv.all_jobs);
         q != ngx_queue_sentinel(&sg_dlv.all_jobs);
         q = ngx_queue_next(q))
    {
        job = ngx_queue_data(q, sg_dlv_job_t, all);
        since = ngx_max(job->claimed, sg_dlv.lease_ok);

        /* a transaction under way or done goes on: too late to hold it */

        if (!job->lapsed && !job->recording && job->sending == NULL
            && (ngx_msec_int_t) (ngx_current_msec - since)
               >= (ngx_msec_int_t) sg_dlv.conf->lease)
        {
            job->lapsed = 1;
            ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                          "sg delivery: %s: its claim was not renewed for"
                          " %M ms (PostgreSQL unavailable) and may have"
                          " been taken over: it is not sent", job->id,
                          ngx_current_msec - since);
        }
    }

    if ((ngx_msec_int_t) (sent - sg_dlv.lease_ok) > 0) {
        sg_dlv.lease_ok = sent;
    }

    if (PQntuples(res) == 1 && ngx_atoi((u_char *) PQgetvalue(res, 0, 1),
                                        PQgetlength(res, 0, 1)) > 0)
    {
        ngx_log_error(NGX_LOG_NOTICE, sg_dlv.log, 0,
                      "sg delivery: released %s recipients whose claim"
                      " ran out (a worker stopped while delivering)",
                      PQgetvalue(res, 0, 1));
        sg_dlv_claim();
    }
}


static void
sg_dlv_claim(void)
{
    char         batch[NGX_INT_T_LEN + 1];
    ngx_uint_t   room;
    const char  *params[3];

    if (!sg_dlv.running || ngx_exiting || ngx_terminate) {
        return;
    }

    if (sg_dlv.claiming) {
        sg_dlv.again = 1;
        return;
    }

    if (sg_lists_current() == NULL || !sg_worker.settings_loaded) {
        return;
    }

    if (!ngx_queue_empty(&sg_dlv.body_waiting)) {
        /*
         * sg_delivery_memory is taken: bodies that would come with new
         * claims would keep the waiting ones waiting
         */
        sg_dlv.again = 1;
        return;
    }

    if (sg_dlv.jobs >= sg_dlv.conf->batch) {
        sg_dlv.again = 1;
        return;
    }

    room = sg_dlv.conf->batch - sg_dlv.jobs;

    ngx_snprintf((u_char *) batch, sizeof(batch) - 1, "%ui%Z", room);

    params[0] = batch;
    params[1] = sg_dlv.worker_id;
    params[2] = sg_dlv.lease_param;

    if (sg_pg_exec(sg_worker.pg, &sg_dlv_claim_stmt, 3, params,
                   sg_dlv_claimed, NULL)
        != NGX_OK)
    {
        return;
    }

    sg_dlv.claiming = 1;
    sg_dlv.claim_sent = ngx_current_msec;
    sg_dlv.again = 0;
}


/* the claimed rows, ordered by nothing: group by message and destination */

static void
sg_dlv_claimed(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    int              n, i, m, a, b, bcol, *rows;
    size_t           len;
    ngx_str_t        domain, address;
    ngx_uint_t       full, nrows;
    u_char          *done;
    sg_dlv_dest_t  **dests;

    sg_dlv.claiming = 0;

    if (err) {
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: cannot claim recipients: %s", err);
        return;
    }

    n = PQntuples(res);
    full = (ngx_uint_t) n >= sg_dlv.conf->batch - sg_dlv.jobs;
    bcol = PQfnumber(res, "body");

    ngx_log_debug1(NGX_LOG_DEBUG_MAIL, sg_dlv.log, 0,
                   "sg delivery: claimed %d recipients", n);

    if (n == 0) {
        goto done;
    }

    dests = ngx_alloc(n * (sizeof(sg_dlv_dest_t *) + sizeof(int) + 1),
                      sg_dlv.log);
    if (dests == NULL) {
        /* the lease brings them back */
        return;
    }

    rows = (int *) (dests + n);
    done = (u_char *) (rows + n);
    ngx_memzero(done, n);

    /*
     * The rows come ordered by message.  Rows of one message and one
     * destination (a domain's MX hosts, a relay host that several domains
     * share, an internal server) become one job: one transaction.
     */

    for (i = 0; i < n; i = m) {
        len = PQgetlength(res, i, 1);

        for (m = i; m < n; m++) {
            if ((size_t) PQgetlength(res, m, 1) != len
                || ngx_strncmp(PQgetvalue(res, m, 1), PQgetvalue(res, i, 1),
                               len) != 0)
            {
                break;
            }

            domain.data = (u_char *) PQgetvalue(res, m, 3);
            domain.len = PQgetlength(res, m, 3);
            address.data = (u_char *) PQgetvalue(res, m, 2);
            address.len = PQgetlength(res, m, 2);

            dests[m] = sg_dlv_dest_for(&domain,
                                       PQgetvalue(res, m, 4)[0] == 't',
                                       &address);

            /* not freed while the message's jobs are made (more than
               SG_DLV_MAX_RCPTS rows of one destination make two) */
            if (dests[m]) {
                dests[m]->busy++;
            }
        }

        for (a = i; a < m; a++) {
            if (done[a]) {
                continue;
            }

            nrows = 0;

            for (b = a; b < m && nrows < SG_DLV_MAX_RCPTS; b++) {
                if (!done[b] && dests[b] == dests[a]) {
                    rows[nrows++] = b;
                    done[b] = 1;
                }
            }

            sg_dlv_claimed_job(res, rows, nrows, dests[a], bcol);
        }

        for (a = i; a < m; a++) {
            if (dests[a] && --dests[a]->busy == 0) {
                sg_dlv_dest_free(dests[a]);
            }
        }
    }

    ngx_free(dests);

done:

    if (full || sg_dlv.again) {
        sg_dlv.again = 0;
        sg_dlv_claim();
    }
}


/* one job from the claimed rows of one message and destination */

static void
sg_dlv_claimed_job(PGresult *res, int *rows, ngx_uint_t nrows,
    sg_dlv_dest_t *dest, int bcol)
{
    int            i, row;
    ngx_uint_t     k;
    ngx_pool_t    *pool;
    sg_dlv_job_t  *job;
    sg_dlv_rcpt_t *r;

    i = rows[0];

    pool = ngx_create_pool(4096, sg_dlv.log);
    if (pool == NULL || PQgetlength(res, i, 1) != 16) {
        /* the lease brings them back */
        if (pool) {
            ngx_destroy_pool(pool);
        }
        return;
    }

    job = ngx_pcalloc(pool, sizeof(sg_dlv_job_t));
    if (job == NULL) {
        ngx_destroy_pool(pool);
        return;
    }

    job->pool = pool;
    job->claimed = sg_dlv.claim_sent;
    ngx_queue_insert_tail(&sg_dlv.all_jobs, &job->all);
    job->dest = dest;
    ngx_memcpy(job->id, PQgetvalue(res, i, 1), 16);
    job->started = sg_dlv_now();

    if (sg_dlv_pstr(pool, &job->sender, PQgetvalue(res, i, 8),
                    PQgetlength(res, i, 8)) != NGX_OK
        || sg_dlv_pstr(pool, &job->ret, PQgetvalue(res, i, 12),
                       PQgetlength(res, i, 12)) != NGX_OK
        || sg_dlv_envid(pool, &job->envid, PQgetvalue(res, i, 13),
                        PQgetlength(res, i, 13)) != NGX_OK)
    {
        ngx_destroy_pool(pool);
        return;
    }

    job->size = ngx_atoof((u_char *) PQgetvalue(res, i, 9),
                          PQgetlength(res, i, 9));
    job->eightbit = (ngx_strcmp(PQgetvalue(res, i, 10), "8BITMIME") == 0);
    job->smtputf8 = (PQgetvalue(res, i, 11)[0] == 't');
    job->requiretls = (PQgetvalue(res, i, 14)[0] == 't');
    job->tls_required_no = (PQgetvalue(res, i, 15)[0] == 't');
    job->received = ngx_atotm((u_char *) PQgetvalue(res, i, 16),
                              PQgetlength(res, i, 16));
    job->requiretls_dsn = (PQgetvalue(res, i, 17)[0] == 't');

    /* the body came with one row of each message and domain, or with none */

    for (k = 0; k < nrows && job->body == NULL; k++) {
        if (sg_dlv_claimed_body(job, res, rows[k], bcol) != NGX_OK) {
            ngx_destroy_pool(pool);
            return;
        }
    }

    job->nrcpts = nrows;
    job->rcpts = ngx_pcalloc(pool, job->nrcpts * sizeof(sg_dlv_rcpt_t));
    job->attempts = json_array();

    if (job->rcpts == NULL || job->attempts == NULL) {
        if (job->attempts) {
            json_decref(job->attempts);
        }
        ngx_destroy_pool(pool);
        return;
    }

    for (k = 0; k < job->nrcpts; k++) {
        r = &job->rcpts[k];
        row = rows[k];
        r->id = ngx_atoof((u_char *) PQgetvalue(res, row, 0),
                          PQgetlength(res, row, 0));
        r->attempts = ngx_atoi((u_char *) PQgetvalue(res, row, 7),
                               PQgetlength(res, row, 7));

        if (sg_dlv_pstr(pool, &r->address, PQgetvalue(res, row, 2),
                        PQgetlength(res, row, 2)) != NGX_OK
            || sg_dlv_pstr(pool, &r->notify, PQgetvalue(res, row, 5),
                           PQgetlength(res, row, 5)) != NGX_OK
            || sg_dlv_pstr(pool, &r->orcpt, PQgetvalue(res, row, 6),
                           PQgetlength(res, row, 6)) != NGX_OK)
        {
            break;
        }

        if (PQgetlength(res, row, 3) == 0 && dest && dest->domain.len) {
            /* <Postmaster>: the first local domain's postmaster */
            r->address.len = sizeof("postmaster@") - 1 + dest->domain.len;
            r->address.data = ngx_pnalloc(pool, r->address.len);
            if (r->address.data == NULL) {
                break;
            }

            ngx_sprintf(r->address.data, "postmaster@%V", &dest->domain);
        }
    }

    if (k < job->nrcpts) {
        json_decref(job->attempts);
        ngx_destroy_pool(pool);
        return;
    }

    sg_dlv.jobs++;

    if (dest == NULL) {
        /* recorded, so that the claim does not come back unchanged */
        sg_dlv_rcpt_outcome(job, NULL, 451, "4.3.5",
                            "no route: <Postmaster> needs a local"
                            " domain, or this worker has no lists yet",
                            NULL, 0);
        sg_dlv_job_finish(job);
        return;
    }

    ngx_queue_insert_tail(&dest->jobs, &job->link);
    dest->njobs++;

    sg_dlv_dest_run(dest);
}


/*
 * The body that came with the claim, as bytea in hex ("\x4142..."); none
 * (SQL NULL: too large, or not the job's first row): job->body stays NULL
 * and sg_dlv_sess_body loads it.
 */

static ngx_int_t
sg_dlv_claimed_body(sg_dlv_job_t *job, PGresult *res, int row, int col)
{
    u_char     *p, *b;
    size_t      len, i;
    ngx_int_t   c;

    if (col < 0 || PQgetisnull(res, row, col)) {
        return NGX_OK;
    }

    p = (u_char *) PQgetvalue(res, row, col);
    len = PQgetlength(res, row, col);

    if (len < 2 || p[0] != '\\' || p[1] != 'x' || (len & 1)) {
        return NGX_OK;
    }

    len = (len - 2) / 2;
    p += 2;

    b = ngx_pnalloc(job->pool, len + 1);
    if (b == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < len; i++) {
        c = ngx_hextoi(p + 2 * i, 2);
        if (c == NGX_ERROR) {
            return NGX_OK;
        }

        b[i] = (u_char) c;
    }

    job->body = b;
    job->body_len = len;
    sg_dlv.bodies += len;

    return NGX_OK;
}


/*
 * The destination of a recipient: a local domain's internal server, a
 * route's relay host, or the domain's MX hosts.
 */

static sg_dlv_dest_t *
sg_dlv_dest_for(ngx_str_t *domain, ngx_uint_t local, ngx_str_t *address)
{
    u_char           *p;
    uint32_t          hash;
    ngx_str_t         key, host, dom;
    in_port_t         port;
    ngx_uint_t        relay, trusted;
    sg_route_t       *route;
    sg_domain_t      *d;
    sg_lists_t       *l;
    sg_dlv_dest_t    *dest;
    u_char            buf[600];

    l = sg_lists_current();
    if (l == NULL) {
        return NULL;
    }

    dom = *domain;
    relay = 0;
    trusted = 0;
    host.len = 0;
    host.data = NULL;
    port = (in_port_t) sg_dlv.conf->port;
    d = NULL;

    if (dom.len == 0) {
        /* <Postmaster> (RFC 5321, 4.5.1): the first local domain */
        if (l->domains.nelts == 0) {
            return NULL;
        }

        d = l->domains.elts;
        dom = d->name;
        local = 1;
    }

    if (local) {
        if (d == NULL) {
            d = sg_lists_domain(l, dom.data, dom.len);
        }

        if (d) {
            host = d->server_host;
            port = d->server_port;
            relay = 1;
            trusted = d->requiretls_trusted;
        }
    }

    if (!relay) {
        route = sg_lists_route(l, &dom);

        if (route) {
            host = route->host;
            port = route->port;
            relay = 1;
        }
    }

    if (relay) {
        /*
         * "trusted for REQUIRETLS" is the domain's setting: domains that
         * share an internal server but not the setting are two
         * destinations, and a changed setting makes a new one
         */
        p = ngx_snprintf(buf, sizeof(buf), "%s%V:%d%s",
                         local ? "local:" : "route:", &host, (int) port,
                         trusted ? ":trusted" : "");

    } else {
        p = ngx_snprintf(buf, sizeof(buf), "%V", &dom);
    }

    key.data = buf;
    key.len = p - buf;

    hash = ngx_crc32_long(key.data, key.len);

    dest = (sg_dlv_dest_t *) ngx_str_rbtree_lookup(&sg_dlv.dests, &key, hash);
    if (dest) {
        return dest;
    }

    dest = ngx_calloc(sizeof(sg_dlv_dest_t) + key.len + dom.len + host.len,
                      sg_dlv.log);
    if (dest == NULL) {
        return NULL;
    }

    p = (u_char *) (dest + 1);

    dest->sn.str.data = p;
    dest->sn.str.len = key.len;
    p = ngx_cpymem(p, key.data, key.len);

    dest->domain.data = p;
    dest->domain.len = dom.len;
    p = ngx_cpymem(p, dom.data, dom.len);

    dest->host.data = p;
    dest->host.len = host.len;
    ngx_memcpy(p, host.data, host.len);

    dest->port = port;
    dest->relay = relay;
    dest->internal_trusted = trusted;
    dest->sn.node.key = hash;

    ngx_queue_init(&dest->jobs);
    ngx_queue_init(&dest->idle);

    ngx_rbtree_insert(&sg_dlv.dests, &dest->sn.node);

    return dest;
}


/* give waiting jobs to idle sessions, then to new ones while there is room */

static void
sg_dlv_dest_run(sg_dlv_dest_t *dest)
{
    /*
     * a session may end inside this function (its body query fails at
     * once) and free the destination: hold it until the end
     */
    dest->busy++;
    sg_dlv_dest_step(dest);
    dest->busy--;

    sg_dlv_dest_free(dest);
}


static void
sg_dlv_dest_step(sg_dlv_dest_t *dest)
{
    ngx_int_t       rc;
    ngx_uint_t      node_full;
    ngx_queue_t    *q;
    sg_dlv_job_t   *job;
    sg_dlv_sess_t  *sess;

    if (ngx_queue_empty(&dest->jobs)) {
        if (dest->in_waiting) {
            ngx_queue_remove(&dest->waiting);
            dest->in_waiting = 0;
        }

        sg_dlv_dest_free(dest);
        return;
    }

    /*
     * the route: from DNS, reused for SG_DLV_ROUTE_TTL.  Sessions hold
     * indexes into the route they started with (sess->route): a busy
     * destination gets a new one all the same, and the old one goes with
     * its last session (sg_dlv_route_release).
     */

    if (dest->route == NULL || dest->route_expires < ngx_time()) {
        if (dest->dns || dest->sts_req) {
            return;
        }

        /*
         * the policy is looked up beside the route; sessions still
         * walking read the answer they have until the new one replaces
         * it (sg_dlv_dest_policy)
         */
        sg_dlv_dest_lookup_policy(dest);

        dest->dns = sg_dns_route(sg_dlv_policy_domain(dest), !dest->relay,
                                 sg_dlv_dest_routed, dest);
        if (dest->dns == NULL) {
            sg_sts_cancel(dest->sts_req);
            dest->sts_req = NULL;
            sg_dlv_dest_fail_all(dest, 0, "4.4.3",
                                 "DNS is not available in this worker");
        }

        return;
    }

    if (dest->route->status != SG_DNS_OK) {
        sg_dlv_dest_fail_all(dest,
                             dest->route->status != SG_DNS_TEMPFAIL,
                             dest->route->status == SG_DNS_NULL_MX
                             ? "5.1.10" : (dest->route->status
                                           == SG_DNS_NOT_FOUND
                                           ? "5.1.2" : "4.4.3"),
                             dest->route->reason);
        return;
    }

    if (dest->sts_expires < ngx_time() && dest->sts_req == NULL) {
        /* the policy again (a new id, a new mode); the route is fresh */
        sg_dlv_dest_lookup_policy(dest);
    }

    if (dest->sts_req) {
        /* sg_dlv_dest_policy() runs the destination */
        return;
    }

    /* idle sessions first: their connections are open */

    while (!ngx_queue_empty(&dest->jobs) && !ngx_queue_empty(&dest->idle)) {
        q = ngx_queue_head(&dest->idle);
        sess = ngx_queue_data(q, sg_dlv_sess_t, link);
        sg_dlv_sess_unidle(sess);

        q = ngx_queue_head(&dest->jobs);
        job = ngx_queue_data(q, sg_dlv_job_t, link);
        ngx_queue_remove(q);
        dest->njobs--;

        sg_dlv_sess_job(sess, job);
    }

    node_full = 0;

    while (!ngx_queue_empty(&dest->jobs)
           && dest->sessions < sg_dlv.conf->dest_concurrency
           && sg_dlv_connections() < sg_dlv.conf->concurrency
           && !ngx_exiting)
    {
        /* the limits hold for the node: other workers' sessions count */

        rc = sg_node_acquire(&dest->sn.str, sg_dlv.conf->dest_concurrency,
                             sg_dlv.conf->concurrency, sg_dlv_connections());

        if (rc != NGX_OK && rc != NGX_DONE) {
            node_full = 1;
            sg_dlv.total_full |= (rc == NGX_DECLINED);
            break;
        }

        q = ngx_queue_head(&dest->jobs);
        job = ngx_queue_data(q, sg_dlv_job_t, link);
        ngx_queue_remove(q);
        dest->njobs--;

        if (sg_dlv_sess_start(dest, job, rc == NGX_OK) != NGX_OK) {
            /* no memory now: when SG_DLV_NODE_WAIT has passed */
            node_full = 1;
            break;
        }
    }

    if (!ngx_queue_empty(&dest->jobs)
        && dest->sessions < sg_dlv.conf->dest_concurrency
        && !ngx_exiting)
    {
        if (sg_dlv_connections() >= sg_dlv.conf->concurrency) {
            node_full = 1;
            sg_dlv.total_full = 1;
        }

        /*
         * no room in the worker: when one of its sessions ends; no room
         * on the node: also when SG_DLV_NODE_WAIT has passed (other
         * workers do not say when theirs end)
         */
        if (!dest->in_waiting) {
            ngx_queue_insert_tail(&sg_dlv.waiting, &dest->waiting);
            dest->in_waiting = 1;
        }
    }

    if (node_full && dest->in_waiting && !sg_dlv.node_wait.timer_set) {
        ngx_add_timer(&sg_dlv.node_wait, SG_DLV_NODE_WAIT);
    }
}


static void
sg_dlv_dest_routed(void *data, sg_dns_route_t *route)
{
    sg_dlv_dest_t   *dest = data;

    sg_dns_route_t  *old;

    dest->dns = NULL;

    old = dest->route;
    dest->route = route;
    sg_dlv_route_release(dest, old, 0);

    dest->route_expires = ngx_time()
                          + (route->status == SG_DNS_OK ? SG_DLV_ROUTE_TTL
                                                        : 0);

    ngx_log_debug2(NGX_LOG_DEBUG_MAIL, sg_dlv.log, 0,
                   "sg delivery: %V routed: %s", &dest->sn.str,
                   route->reason ? route->reason : "ok");

    sg_dlv_dest_run(dest);
}


/*
 * A session no longer walks route (used: it held it), or the destination
 * has a newer one: the last user of a route that is no longer the
 * destination's frees it.
 */

static void
sg_dlv_route_release(sg_dlv_dest_t *dest, sg_dns_route_t *route,
    ngx_uint_t used)
{
    if (route == NULL) {
        return;
    }

    route->refs -= used;

    if (route->refs == 0 && route != dest->route) {
        ngx_destroy_pool(route->pool);
    }
}


/*
 * RFC 8461, 3.4: the policy of the recipient domain; through a route or to
 * an internal server, of the host sg connects to (an address literal has
 * none).  The same name is the one looked up in DNS.
 */

static ngx_str_t *
sg_dlv_policy_domain(sg_dlv_dest_t *dest)
{
    return dest->relay ? &dest->host : &dest->domain;
}


static void
sg_dlv_dest_lookup_policy(sg_dlv_dest_t *dest)
{
    dest->sts_req = sg_sts_lookup(sg_dlv_policy_domain(dest),
                                  sg_dlv_dest_policy, dest);
    dest->sts_expires = ngx_time() + SG_DLV_ROUTE_TTL;
}


/* the MTA-STS answer for the destination (no policy, or one to apply) */

static void
sg_dlv_dest_policy(void *data, sg_sts_answer_t *answer)
{
    sg_dlv_dest_t  *dest = data;

    dest->sts_req = NULL;
    dest->sts_expires = ngx_time() + SG_DLV_ROUTE_TTL;

    /* sessions read dest->sts only when they decide and record */
    sg_sts_release(dest->sts);
    dest->sts = answer;

    if (answer->result_type) {
        /* RFC 8461, 5.1: delivery goes on as without a policy */
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: %V: MTA-STS policy of \"%V\" not"
                      " available (%s): %s", &dest->sn.str, &answer->domain,
                      answer->result_type, answer->reason);
    }

    ngx_log_debug4(NGX_LOG_DEBUG_MAIL, sg_dlv.log, 0,
                   "sg delivery: %V MTA-STS of \"%V\": mode %d: %s",
                   &dest->sn.str, &answer->domain, (int) answer->mode,
                   answer->reason);

    sg_dlv_dest_run(dest);
}


/* DNS said no: every waiting job fails the same way */

static void
sg_dlv_dest_fail_all(sg_dlv_dest_t *dest, ngx_uint_t bounce,
    const char *status, const char *reply)
{
    ngx_uint_t     i;
    ngx_queue_t   *q;
    sg_dlv_job_t  *job;

    while (!ngx_queue_empty(&dest->jobs)) {
        q = ngx_queue_head(&dest->jobs);
        job = ngx_queue_data(q, sg_dlv_job_t, link);
        ngx_queue_remove(q);
        dest->njobs--;

        for (i = 0; i < job->nrcpts; i++) {
            sg_dlv_rcpt_outcome(job, &job->rcpts[i], bounce ? 550 : 451,
                                status, reply ? reply : "DNS failure",
                                NULL, 0);
        }

        sg_dlv_job_finish(job);
    }

    if (dest->in_waiting) {
        ngx_queue_remove(&dest->waiting);
        dest->in_waiting = 0;
    }

    sg_dlv_dest_free(dest);
}


/* a destination with no jobs, no sessions and no lookup goes away */

static void
sg_dlv_dest_free(sg_dlv_dest_t *dest)
{
    if (!ngx_queue_empty(&dest->jobs) || dest->sessions || dest->dns
        || dest->sts_req || dest->busy)
    {
        return;
    }

    if (dest->in_waiting) {
        ngx_queue_remove(&dest->waiting);
    }

    sg_sts_release(dest->sts);

    if (dest->route) {
        ngx_destroy_pool(dest->route->pool);
    }

    ngx_rbtree_delete(&sg_dlv.dests, &dest->sn.node);
    ngx_free(dest);
}


/*
 * A connection that said QUIT is closed: it counted against
 * sg_delivery_concurrency until now (connections open at once).
 */

static void
sg_dlv_client_closed(void)
{
    sg_node_connections(sg_dlv_connections());

    if (sg_dlv.running && !ngx_exiting) {
        sg_dlv_run_waiting();
    }
}


static void
sg_dlv_run_waiting(void)
{
    ngx_queue_t    *q, turn;
    sg_dlv_dest_t  *dest;

    if (ngx_queue_empty(&sg_dlv.waiting)) {
        return;
    }

    /*
     * Each destination once: one the node has no room for queues itself
     * again.  Stopping, no session starts: a destination run from here
     * would only queue itself again (a worker spun on this once).
     */

    ngx_queue_init(&turn);
    ngx_queue_add(&turn, &sg_dlv.waiting);
    ngx_queue_init(&sg_dlv.waiting);

    while (!ngx_queue_empty(&turn)
           && sg_dlv_connections() < sg_dlv.conf->concurrency
           && !ngx_exiting)
    {
        q = ngx_queue_head(&turn);
        dest = ngx_queue_data(q, sg_dlv_dest_t, waiting);
        ngx_queue_remove(q);
        dest->in_waiting = 0;

        sg_dlv_dest_run(dest);
    }

    /* those not run keep their place, before the ones queued meanwhile */

    if (!ngx_queue_empty(&turn)) {
        if (!ngx_queue_empty(&sg_dlv.waiting)) {
            ngx_queue_add(&turn, &sg_dlv.waiting);
        }

        ngx_queue_init(&sg_dlv.waiting);
        ngx_queue_add(&sg_dlv.waiting, &turn);

        /* no room in the worker: its idle connections may have to go */
        sg_dlv.total_full = 1;
    }

    /* while mail waits, look again: room may come from other workers */

    if (!ngx_queue_empty(&sg_dlv.waiting) && !sg_dlv.node_wait.timer_set
        && !ngx_exiting)
    {
        ngx_add_timer(&sg_dlv.node_wait, SG_DLV_NODE_WAIT);
    }
}


static void
sg_dlv_node_wait_handler(ngx_event_t *ev)
{
    sg_dlv_sess_t  *sess;

    if (!sg_dlv.running || ngx_exiting) {
        return;
    }

    sg_node_sweep();

    /*
     * Mail waits for room in all (in the worker or on the node): the
     * connection idle the longest, kept for a destination without mail,
     * closes for it (one each time: its QUIT counts until it is closed).
     */

    sg_dlv.total_full = 0;

    sg_dlv_run_waiting();

    /*
     * the worker is full by its own count, or it waits for room on the
     * node and no connection has given way for it yet
     */

    if (sg_dlv.total_full && !ngx_queue_empty(&sg_dlv.waiting)
        && !ngx_queue_empty(&sg_dlv.idle)
        && (sg_dlv_connections() >= sg_dlv.conf->concurrency
            || sg_node_serve_own()))
    {
        sess = ngx_queue_data(ngx_queue_head(&sg_dlv.idle), sg_dlv_sess_t,
                              idle_all);
        sg_dlv_sess_idle_close(sess);
    }
}


/* connections open now: sessions, and connections saying QUIT */

static ngx_uint_t
sg_dlv_connections(void)
{
    return sg_dlv.sessions + sg_dlv.client.closing;
}


/* counted: the session counts on the node (sg_node_acquire() said so) */

static ngx_int_t
sg_dlv_sess_start(sg_dlv_dest_t *dest, sg_dlv_job_t *job, ngx_uint_t counted)
{
    sg_dlv_sess_t  *sess;

    sess = ngx_calloc(sizeof(sg_dlv_sess_t), sg_dlv.log);
    if (sess == NULL) {
        if (counted) {
            sg_node_release(&dest->sn.str, sg_dlv_connections());
        }

        ngx_queue_insert_head(&dest->jobs, &job->link);
        dest->njobs++;
        return NGX_ERROR;
    }

    sess->node_counted = counted;

    sess->dest = dest;
    sess->self = sess;
    sess->idle.handler = sg_dlv_sess_idle_handler;
    sess->idle.data = &sg_dlv.dummy;
    sess->idle.log = sg_dlv.log;
    sess->idle.cancelable = 1;

    dest->sessions++;
    sg_dlv.sessions++;

    sg_dlv_sess_job(sess, job);

    return NGX_OK;
}


/* the session's connection goes (QUIT); the node learns the count */

static void
sg_dlv_sess_drop_client(sg_dlv_sess_t *sess)
{
    sg_client_close(sess->client);
    sess->client = NULL;

    sg_node_connections(sg_dlv_connections());
}


/* a job for this session: its body first, then a connection */

static void
sg_dlv_sess_job(sg_dlv_sess_t *sess, sg_dlv_job_t *job)
{
    sg_dlv_dest_t  *dest;

    dest = sess->dest;
    sess->job = job;

    if (sess->route != dest->route
        && dest->route && dest->route->status == SG_DNS_OK)
    {
        /*
         * the destination was routed again: the job walks the new route,
         * and a connection kept from the old one is not reused
         */
        if (sess->client) {
            sg_dlv_sess_drop_client(sess);
        }

        sg_dlv_route_release(dest, sess->route, 1);
        sess->route = dest->route;
        sess->route->refs++;
    }

    if (sess->client == NULL) {
        sess->host = 0;
        sess->addr = 0;
    }

    sess->tried = 0;
    sess->connects = 0;
    sess->answered = 0;
    sess->policy_fail = 0;
    sess->no_requiretls = 0;
    sess->clear_retry = 0;
    sess->limited = 0;
    sess->reason[0] = '\0';
    sess->reasons_len = 0;

    sg_dlv_sess_body(sess);
}


static void
sg_dlv_sess_body(sg_dlv_sess_t *sess)
{
    sg_pg_param_t   param;
    sg_dlv_job_t   *job;

    job = sess->job;

    if (job->body) {
        /* it came with the claim */
        sg_dlv_sess_decide(sess);
        return;
    }

    if (sg_dlv.bodies && sg_dlv.bodies + (size_t) job->size
                         > sg_dlv.conf->memory)
    {
        /* sg_delivery_memory: when another job's body is freed */
        ngx_log_debug2(NGX_LOG_DEBUG_MAIL, sg_dlv.log, 0,
                       "sg delivery: %s waits for memory (%uz bytes held)",
                       job->id, sg_dlv.bodies);
        ngx_queue_insert_tail(&sg_dlv.body_waiting, &sess->link);
        return;
    }

    param.data = (const char *) job->id;
    param.len = 16;
    param.binary = 0;

    if (sg_pg_exec_binary(sg_worker.pg, &sg_dlv_body_stmt, 1, &param,
                          sg_dlv_body_loaded, sess)
        != NGX_OK)
    {
        /* PostgreSQL is away: the claim is released by the lease */
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: %s: cannot load the message, PostgreSQL"
                      " is unavailable", job->id);
        sg_dlv_rcpt_outcome(job, NULL, 451, "4.3.0",
                            "the queue is unavailable", NULL, 0);
        sg_dlv_job_finish(job);
        sess->job = NULL;
        sg_dlv_sess_done(sess);
    }
}


static void
sg_dlv_body_loaded(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    sg_dlv_sess_t  *sess = data;

    size_t          len;
    sg_dlv_job_t   *job;

    job = sess->job;

    if (err || PQntuples(res) != 1) {
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: %s: cannot load the message: %s",
                      job->id, err ? err : "it is gone");
        sg_dlv_rcpt_outcome(job, NULL, 451, "4.3.0",
                            "the queue is unavailable", NULL, 0);
        sg_dlv_job_finish(job);
        sess->job = NULL;
        sg_dlv_sess_done(sess);
        return;
    }

    len = PQgetlength(res, 0, 0);

    job->body = ngx_pnalloc(job->pool, len + 1);
    if (job->body == NULL) {
        sg_dlv_rcpt_outcome(job, NULL, 451, "4.3.0", "out of memory",
                            NULL, 0);
        sg_dlv_job_finish(job);
        sess->job = NULL;
        sg_dlv_sess_done(sess);
        return;
    }

    ngx_memcpy(job->body, PQgetvalue(res, 0, 0), len);
    job->body_len = len;
    sg_dlv.bodies += len;

    sg_dlv_sess_decide(sess);
}


/* the next address of this host, or the next host */

static void
sg_dlv_sess_next_host(sg_dlv_sess_t *sess)
{
    sg_dns_route_t  *route;

    route = sess->route;

    sess->clear_retry = 0;

    if (sess->host < route->nhosts
        && sess->addr + 1 < route->hosts[sess->host].naddrs)
    {
        sess->addr++;

    } else {
        sess->host++;
        sess->addr = 0;
    }

    sg_dlv_sess_decide(sess);
}


/*
 * The outbound TLS decision for this message and this host and address
 * (DESIGN.md's table, sg_tls_decide).
 */

static void
sg_dlv_sess_decide(sg_dlv_sess_t *sess)
{
    sg_lists_t          *l;
    sg_dns_host_t       *h;
    sg_dlv_job_t        *job;
    sg_dlv_dest_t       *dest;
    sg_settings_t       *st;
    sg_tls_facts_t       f;
    sg_tls_decision_t    d;

    dest = sess->dest;
    job = sess->job;

    if (sess->host >= sess->route->nhosts) {
        sg_dlv_sess_exhausted(sess);
        return;
    }

    h = &sess->route->hosts[sess->host];

    if (h->naddrs == 0) {
        sess->host++;
        sess->addr = 0;
        sg_dlv_sess_decide(sess);
        return;
    }

    sess->host_name = h->name;
    sess->peer = h->addrs[sess->addr];
    ngx_inet_set_port(sess->peer.sockaddr,
                      dest->relay ? dest->port : (in_port_t) sg_dlv.conf->port);
    sess->ip_len = ngx_sock_ntop(sess->peer.sockaddr, sess->peer.socklen,
                                 sess->ip, sizeof(sess->ip), 0);

    st = sg_worker.settings;
    l = sg_lists_current();

    ngx_memzero(&f, sizeof(sg_tls_facts_t));

    f.requiretls = job->requiretls;
    f.tls_required_no = job->tls_required_no;
    f.requiretls_dsn = job->requiretls_dsn;
    f.requiretls_enabled = st->requiretls_enabled;
    f.mta_sts_enabled = st->mta_sts_enabled;
    f.starttls_outbound = st->starttls_outbound;
    f.tls_failure_fallback = st->tls_failure_fallback;
    f.mx_dnssec = sess->route->mx_secure && !dest->relay;
    f.configured_host = dest->relay;
    f.internal_trusted = dest->internal_trusted;

    /* RFC 8461, 4.1: does H match the policy's mx patterns? */

    sess->sts_mismatch = 0;

    if (dest->sts && dest->sts->mode != SG_STS_NONE) {
        f.sts_mode = dest->sts->mode;
        f.sts_mx_match = sg_sts_match_mx(dest->sts, &h->name);
        sess->sts_mismatch = !f.sts_mx_match;
    }

    if (l) {
        f.on_required_list = sg_lists_required(l, sess->peer.sockaddr,
                                               &h->name);
        f.on_whitelist = sg_lists_whitelisted(l, sess->peer.sockaddr,
                                              &h->name)
                         || (!dest->relay
                             && sg_lists_whitelisted(l, NULL, &dest->domain));
    }

    sg_tls_decide(&f, &d);

    if (d.skip && sess->client) {
        /*
         * kept for this host, which this job skips: the job walks the
         * MX hosts from the first, without it
         */
        sg_dlv_sess_drop_client(sess);
        sess->host = 0;
        sess->addr = 0;
        sg_dlv_sess_decide(sess);
        return;
    }

    if (d.skip) {
        sess->decision = d;
        sess->tried++;

        /*
         * a policy that could not be fetched is a transient failure: a
         * flagged message waits for it rather than bounce (RFC 8689, 4.1
         * needs the policy)
         */
        sess->policy_fail += d.bounce
                             && !(dest->sts && dest->sts->result_type);
        ngx_snprintf(sess->reason, sizeof(sess->reason) - 1, "%V: %s%Z",
                     &h->name, d.reason);
        sg_dlv_sess_note(sess);
        sg_dlv_attempt(sess, NULL, "next_mx", d.reason);

        /* every address of this host gets the same answer */
        sess->host++;
        sess->addr = 0;
        sg_dlv_sess_decide(sess);
        return;
    }

    /* a kept connection serves the job if it was opened the same way */

    if (sess->client) {
        if (sg_client_info(sess->client)->step == SG_CLIENT_OK
            && sess->decision.level == d.level
            && sess->decision.need_requiretls == d.need_requiretls)
        {
            /* this job's decision: its rule, reason, REQUIRETLS */
            sess->decision = d;
            sg_dlv_sess_send(sess);
            return;
        }

        /*
         * the peer closed it while it was idle, or it was opened another
         * way: the job walks the MX hosts from the first
         */
        sg_dlv_sess_drop_client(sess);

        if (sess->host != 0 || sess->addr != 0) {
            sess->host = 0;
            sess->addr = 0;
            sg_dlv_sess_decide(sess);
            return;
        }
    }

    sess->decision = d;

    /*
     * Bounds on one delivery's MX walk (as Postfix's
     * smtp_mx_address_limit and smtp_mx_session_limit): a domain with
     * many hosts and addresses must not hold the job for hours of
     * connect timeouts.
     */

    if (sess->connects >= sg_dlv.conf->mx_address_limit
        || sess->answered >= sg_dlv.conf->mx_session_limit)
    {
        ngx_snprintf(sess->reason, sizeof(sess->reason) - 1,
                     "%s (%ui) reached before %V%Z",
                     sess->connects >= sg_dlv.conf->mx_address_limit
                     ? "sg_delivery_mx_address_limit"
                     : "sg_delivery_mx_session_limit",
                     sess->connects >= sg_dlv.conf->mx_address_limit
                     ? sg_dlv.conf->mx_address_limit
                     : sg_dlv.conf->mx_session_limit,
                     &h->name);
        sg_dlv_sess_note(sess);
        sess->limited = 1;
        sg_dlv_sess_exhausted(sess);
        return;
    }

    if (d.fallback) {
        /* 6: is the host on the hourly TLS-failure list? */
        sg_dlv_failure_check(sess);
        return;
    }

    sg_dlv_sess_open(sess);
}


static void
sg_dlv_sess_failure_listed(sg_dlv_sess_t *sess, ngx_uint_t listed)
{
    sg_tls_facts_t  f;

    if (listed) {
        ngx_memzero(&f, sizeof(sg_tls_facts_t));
        f.starttls_outbound = 1;
        f.tls_failure_fallback = 1;
        f.on_failure_list = 1;
        sg_tls_decide(&f, &sess->decision);
    }

    sg_dlv_sess_open(sess);
}


static void
sg_dlv_sess_open(sg_dlv_sess_t *sess)
{
    sess->started = sg_dlv_now();
    sess->tried++;
    sess->connects++;

    if (sg_client_open(&sg_dlv.client, &sess->host_name, &sess->peer,
                       &sess->decision, sg_dlv_sess_opened, sess)
        == NULL)
    {
        ngx_snprintf(sess->reason, sizeof(sess->reason) - 1,
                     "%V[%*s]: out of memory%Z", &sess->host_name,
                     sess->ip_len, sess->ip);
        sg_dlv_sess_exhausted(sess);
    }
}


static void
sg_dlv_sess_opened(void *data, sg_client_t *c, sg_client_info_t *info)
{
    sg_dlv_sess_t  *sess = data;

    u_char          reason[SG_DLV_REPLY_MAX];
    const char     *why;

    if (info->step == SG_CLIENT_OK) {
        sess->client = c;
        sess->kept = 0;
        sg_dlv_sess_send(sess);
        return;
    }

    why = info->reply.code ? (const char *) info->reply.text
                           : (info->reason ? info->reason : "failed");

    sess->answered += (info->step != SG_CLIENT_CONNECT);

    ngx_snprintf(sess->reason, sizeof(sess->reason) - 1, "%V[%*s]: %s%Z",
                 &sess->host_name, sess->ip_len, sess->ip, why);
    sg_dlv_sess_note(sess);

    if (info->step == SG_CLIENT_HANDSHAKE && sess->decision.retry_clear
        && !sess->decision.fallback && !sess->clear_retry)
    {
        /*
         * RFC 8689, 5: the bounce of a flagged message is not discarded:
         * STARTTLS was tried only to send it with REQUIRETLS; again at
         * once, in clear (the host is not listed: the hourly fallback
         * setting is off)
         */
        ngx_snprintf(reason, sizeof(reason) - 1,
                     "TLS handshake failed (%s): retrying at once without"
                     " STARTTLS%Z", why);
        sg_dlv_attempt(sess, info, "retry_clear", (char *) reason);

        sess->clear_retry = 1;
        sess->decision.level = SG_TLS_NONE;
        sess->decision.reason = "the bounce of a REQUIRETLS message: the"
                                " TLS handshake failed, sent in clear"
                                " (RFC 8689, 5)";
        sg_dlv_sess_open(sess);
        return;
    }

    if (info->step == SG_CLIENT_HANDSHAKE && sess->decision.fallback
        && !sess->clear_retry)
    {
        /*
         * 6: "SSL negotiation failures will retry without SSL for up to
         * one hour": list the host, retry at once in clear.
         */
        ngx_snprintf(reason, sizeof(reason) - 1,
                     "TLS handshake failed (%s): retrying at once without"
                     " STARTTLS; the host stays on the TLS-failure list"
                     " until the list is reset%Z", why);
        sg_dlv_attempt(sess, info, "retry_clear", (char *) reason);
        sg_dlv_failure_add(sess, why);

        sess->clear_retry = 1;
        sg_dlv_sess_failure_listed(sess, 1);
        return;
    }

    /*
     * RFC 8689, 4.1: a requirement this host failed; a timeout, a closed
     * connection or a 4xx is transient and defers as usual (issue 6)
     */
    if (sess->decision.bounce
        && (info->step == SG_CLIENT_NO_STARTTLS
            || (info->step == SG_CLIENT_STARTTLS && info->reply.code >= 500)
            || (info->step == SG_CLIENT_HANDSHAKE && !info->transient)
            || info->step == SG_CLIENT_VERIFY
            || info->step == SG_CLIENT_NO_REQUIRETLS))
    {
        sess->policy_fail++;

        if (info->step == SG_CLIENT_NO_REQUIRETLS) {
            sess->no_requiretls = 1;
        }
    }

    sg_dlv_attempt(sess, info, "next_mx", (char *) sess->reason);

    sg_dlv_sess_next_host(sess);
}


/* one transaction of the job over the open connection */

static void
sg_dlv_sess_send(sg_dlv_sess_t *sess)
{
    ngx_uint_t         i, n;
    ngx_msec_t         since;
    sg_dlv_job_t      *job;
    sg_client_txn_t   *txn;
    sg_client_info_t  *info;

    job = sess->job;
    info = sg_client_info(sess->client);

    /*
     * PostgreSQL has not renewed the job's claim for two renewal periods
     * (it may run out soon), or renewed it only after it may have run out
     * (lapsed): another worker may then claim and send the message too.
     * Not sent; the claim comes back (docs/design.md, "Delivered twice").
     */
    since = ngx_max(job->claimed, sg_dlv.lease_ok);

    if (job->lapsed
        || ngx_current_msec - since
           > sg_dlv.conf->lease - sg_dlv.conf->lease / 3)
    {
        job->lapsed = 1;            /* due again at once */
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: %s: not sent: its claim was not renewed"
                      " for %M ms (PostgreSQL unavailable)", job->id,
                      ngx_current_msec - since);
        sg_dlv_sess_not_sent(sess, "4.3.0",
                             "not sent: the claim could not be renewed");
        return;
    }

    if (sess->decision.need_requiretls && !info->requiretls) {
        /*
         * RFC 8689, 4.1: never without the keyword (a kept connection
         * opened for another job must not carry this one)
         */
        ngx_log_error(NGX_LOG_ERR, sg_dlv.log, 0,
                      "sg delivery: %s: the connection to %V does not offer"
                      " REQUIRETLS: not sent", job->id, &sess->host_name);
        sg_dlv_sess_drop_client(sess);
        sg_dlv_sess_not_sent(sess, "4.7.0",
                             "the connection does not offer REQUIRETLS");
        return;
    }

    if (info->size_limit && job->size > info->size_limit) {
        /* RFC 1870, 6.1: the next hop's fixed limit */
        sg_dlv_sess_refuse(sess, info, 552, "5.3.4",
                           "552 5.3.4 the message is bigger than the next"
                           " hop accepts (SIZE, RFC 1870, 6.1)");
        return;
    }

    if (job->eightbit && !info->eightbitmime) {
        /* RFC 6152, 3: 8-bit data only to a server that offers 8BITMIME */
        sg_dlv_sess_refuse(sess, info, 554, "5.6.3",
                           "554 5.6.3 the message has 8-bit data and the"
                           " next hop does not offer 8BITMIME (RFC 6152, 3)");
        return;
    }

    txn = ngx_pcalloc(job->pool, sizeof(sg_client_txn_t));
    if (txn == NULL) {
        goto failed;
    }

    txn->rcpts = ngx_pcalloc(job->pool,
                             job->nrcpts * sizeof(sg_client_rcpt_t));
    if (txn->rcpts == NULL) {
        goto failed;
    }

    n = 0;

    txn->sender = job->sender;
    txn->size = job->size;
    txn->eightbit = job->eightbit;
    txn->smtputf8 = job->smtputf8;
    /*
     * RFC 8689, 5: the DSN of a flagged message is sent with REQUIRETLS
     * when the next hop supports it, and not discarded when it does not
     */
    txn->requiretls = info->requiretls
                      && (sess->decision.send_requiretls
                          || (job->requiretls_dsn
                              && sg_worker.settings->requiretls_enabled));
    txn->ret = job->ret;
    txn->envid = job->envid;
    txn->body = job->body;
    txn->body_len = job->body_len;

    /* the recipients without a result (a 452 leaves some for the next) */

    for (i = 0; i < job->nrcpts; i++) {
        if (job->rcpts[i].state != SG_RCPT_PENDING) {
            continue;
        }

        txn->rcpts[n].address = job->rcpts[i].address;
        txn->rcpts[n].notify = job->rcpts[i].notify;
        txn->rcpts[n].orcpt = job->rcpts[i].orcpt;
        n++;
    }

    txn->nrcpts = n;

    sess->started = sg_dlv_now();

    job->sending = txn;
    sg_client_send(sess->client, txn, sg_dlv_sess_sent, sess);
    return;

failed:

    sg_dlv_rcpt_outcome(job, NULL, 451, "4.3.0", "out of memory", NULL, 0);
    sg_dlv_job_finish(job);
    sess->job = NULL;
    sg_dlv_sess_done(sess);
}


/* the job is not sent now: every pending recipient is deferred */

static void
sg_dlv_sess_not_sent(sg_dlv_sess_t *sess, const char *status,
    const char *reply)
{
    sg_dlv_job_t  *job;

    job = sess->job;

    sg_dlv_rcpt_outcome(job, NULL, 451, status, reply, NULL, 0);
    sg_dlv_job_finish(job);
    sess->job = NULL;
    sg_dlv_sess_done(sess);
}


/* sg itself refuses to send the job to this next hop: every recipient */

static void
sg_dlv_sess_refuse(sg_dlv_sess_t *sess, sg_client_info_t *info,
    ngx_uint_t code, const char *status, const char *reply)
{
    sg_dlv_job_t  *job;

    job = sess->job;

    /* the row first: it lists the recipients still pending */
    sg_dlv_attempt(sess, info, code / 100 == 5 ? "bounced" : "deferred",
                   reply);
    sg_dlv_rcpt_outcome(job, NULL, code, status, reply, &sess->host_name, 0);

    sg_dlv_job_finish(job);
    sess->job = NULL;
    sg_dlv_sess_done(sess);
}


static void
sg_dlv_sess_sent(void *data, sg_client_t *c, sg_client_txn_t *txn)
{
    sg_dlv_sess_t  *sess = data;

    u_char             lost[256];
    ngx_uint_t         i, k, delivered, bounced, dsn_peer, more;
    const char        *result;
    sg_dlv_job_t      *job;
    sg_dlv_rcpt_t     *r, *first;
    sg_client_rcpt_t  *tr;
    sg_client_info_t  *info;
    sg_client_reply_t *reply;

    job = sess->job;
    job->sending = NULL;
    info = sg_client_info(c);
    dsn_peer = info->dsn;
    delivered = 0;
    bounced = 0;
    more = 0;
    first = NULL;

    if (sess->kept && txn->step != SG_CLIENT_OK
        && txn->mail_reply.code == 0 && !txn->data_sent)
    {
        /*
         * the peer closed the kept connection while it was idle, and
         * its close crossed MAIL FROM: nothing was transacted, so the
         * job walks the MX hosts from the first, at once (the client
         * closed this one)
         */
        ngx_log_error(NGX_LOG_INFO, sg_dlv.log, 0,
                      "sg delivery: %s: the kept connection to %V[%*s] was"
                      " lost before MAIL FROM was answered (%s); opening"
                      " a new one", job->id, &sess->host_name,
                      sess->ip_len, sess->ip,
                      info->reason ? info->reason : "closed");

        sess->client = NULL;
        sess->kept = 0;
        sess->host = 0;
        sess->addr = 0;
        sg_dlv_sess_decide(sess);
        return;
    }

    /* txn->rcpts are the job's pending recipients, in order */

    for (i = 0, k = 0; i < job->nrcpts && k < txn->nrcpts; i++) {
        r = &job->rcpts[i];

        if (r->address.data != txn->rcpts[k].address.data) {
            /* it has its result from an earlier transaction */
            continue;
        }

        tr = &txn->rcpts[k++];

        if (first == NULL) {
            first = r;
        }

        if (txn->mail_reply.code && txn->mail_reply.code / 100 != 2) {
            reply = &txn->mail_reply;

        } else if (tr->accepted && txn->step == SG_CLIENT_OK) {
            reply = txn->data_reply.code ? &txn->data_reply : &tr->reply;

        } else if (tr->reply.code && !tr->accepted) {
            reply = &tr->reply;

            if (reply->code == 552) {
                /*
                 * RFC 5321, 4.5.3.1.10: 552 to RCPT is RFC 821's "too
                 * many recipients"; it is treated as 452, temporary
                 */
                reply->code = 452;

                if (reply->status[0] == '5') {
                    reply->status[0] = '4';
                }
            }

            more += (reply->code == 452);

        } else {
            reply = NULL;
        }

        if (reply == NULL || reply->code == 0) {
            /* the connection failed in the transaction: say how */
            *ngx_snprintf(lost, sizeof(lost) - 1, "%s (%s)",
                         txn->data_sent
                         ? "the connection was lost after the message was"
                           " sent; it is sent again"
                         : "the connection was lost during the transaction",
                         info->reason ? info->reason : "closed") = '\0';
            sg_dlv_rcpt_outcome(job, r, 451, "4.4.2", (char *) lost,
                                &sess->host_name, dsn_peer);

        } else {
            sg_dlv_rcpt_reply(job, r, reply, &sess->host_name, dsn_peer);
        }

        delivered += (r->state == SG_RCPT_DELIVERED);
        bounced += (r->state == SG_RCPT_BOUNCED);
    }

    result = delivered ? "delivered"
                       : (bounced == txn->nrcpts ? "bounced" : "deferred");

    job->txn = txn;
    sg_dlv_attempt(sess, info, result,
                   txn->data_reply.code ? (char *) txn->data_reply.text
                   : (txn->mail_reply.code && txn->mail_reply.code / 100 != 2
                      ? (char *) txn->mail_reply.text
                      : (first ? (char *) first->reply : "")));
    job->txn = NULL;

    if (txn->step != SG_CLIENT_OK) {
        /* the client closed the connection */
        sess->client = NULL;
    }

    if (more && delivered && sess->client) {
        /*
         * RFC 5321, 4.5.3.1.10: the server took only so many recipients
         * (452 to the others): those go in a new transaction, now
         */
        for (i = 0, k = 0; i < job->nrcpts && k < txn->nrcpts; i++) {
            if (job->rcpts[i].address.data != txn->rcpts[k].address.data) {
                continue;
            }

            tr = &txn->rcpts[k++];

            if (!tr->accepted && tr->reply.code == 452) {
                job->rcpts[i].state = SG_RCPT_PENDING;
            }
        }

        sg_dlv_sess_send(sess);
        return;
    }

    sess->kept = (sess->client != NULL);

    sg_dlv_job_finish(job);
    sess->job = NULL;

    sg_dlv_sess_done(sess);
}


/* every host and address failed: defer, or bounce for a policy */

static void
sg_dlv_sess_exhausted(sg_dlv_sess_t *sess)
{
    ngx_uint_t     i, bounce;
    sg_dlv_job_t  *job;
    u_char         reply[SG_DLV_REPLY_MAX];

    job = sess->job;

    /*
     * RFC 8689, 4.1: no MX qualifies for a REQUIRETLS message (all were
     * tried: a walk limit leaves hosts that might, and defers)
     */
    bounce = sess->decision.bounce && sess->tried && !sess->limited
             && sess->policy_fail == sess->tried;

    /* RFC 8689, 5: the diagnostic names each MX and what it failed */

    ngx_snprintf(reply, sizeof(reply) - 1, "%s%s%*s%Z",
                 bounce ? (sess->no_requiretls
                           ? "REQUIRETLS: no MX host offers REQUIRETLS with"
                             " verified TLS: "
                           : "REQUIRETLS: no MX host qualifies: ")
                        : "",
                 sess->reasons_len ? "" : "no host could be reached",
                 sess->reasons_len, sess->reasons);

    for (i = 0; i < job->nrcpts; i++) {
        sg_dlv_rcpt_outcome(job, &job->rcpts[i], bounce ? 550 : 451,
                            bounce ? (sess->no_requiretls ? "5.7.30"
                                                          : "5.7.10")
                                   : "4.4.1",
                            (char *) reply, NULL, 0);
    }

    sg_dlv_job_finish(job);
    sess->job = NULL;

    sg_dlv_sess_done(sess);
}


/* the host's failure (sess->reason) joins the job's list of them */

static void
sg_dlv_sess_note(sg_dlv_sess_t *sess)
{
    u_char  *p, *last;

    p = sess->reasons + sess->reasons_len;
    last = sess->reasons + sizeof(sess->reasons);

    if (sess->reasons_len) {
        p = ngx_slprintf(p, last, "; ");
    }

    p = ngx_slprintf(p, last, "%s", sess->reason);

    sess->reasons_len = p - sess->reasons;
}


/* the job is finished: the next one, idle, or the end of the session */

static void
sg_dlv_sess_done(sg_dlv_sess_t *sess)
{
    ngx_uint_t      next, yield;
    ngx_queue_t    *q;
    sg_dlv_job_t   *job;
    sg_dlv_dest_t  *dest;

    dest = sess->dest;

    next = !ngx_queue_empty(&dest->jobs) && !ngx_exiting;

    /*
     * another worker waits for room that this session holds: it closes
     * (the node reserved the room for that worker; this worker's next
     * jobs wait their turn)
     */

    yield = sess->node_counted
            && sg_node_yield(&dest->sn.str, sg_dlv.conf->dest_concurrency,
                             sg_dlv.conf->concurrency, next);

    if (yield) {
        ngx_log_debug1(NGX_LOG_DEBUG_MAIL, sg_dlv.log, 0,
                       "sg delivery: %V: a session gives way to another"
                       " worker", &dest->sn.str);
    }

    if (next && !yield) {
        q = ngx_queue_head(&dest->jobs);
        job = ngx_queue_data(q, sg_dlv_job_t, link);
        ngx_queue_remove(q);
        dest->njobs--;

        sg_dlv_sess_job(sess, job);
        return;
    }

    /* this worker's mail for other destinations waits for room in all */

    if (!next && !ngx_queue_empty(&sg_dlv.waiting)
        && sg_dlv_connections() >= sg_dlv.conf->concurrency)
    {
        ngx_log_debug1(NGX_LOG_DEBUG_MAIL, sg_dlv.log, 0,
                       "sg delivery: %V: a session closes for this worker's"
                       " mail to other destinations", &dest->sn.str);
        yield = 1;
    }

    if (sess->client && !yield && !ngx_exiting && !ngx_terminate) {
        ngx_queue_insert_tail(&dest->idle, &sess->link);
        ngx_queue_insert_tail(&sg_dlv.idle, &sess->idle_all);
        sess->idle_since = ngx_current_msec;
        ngx_add_timer(&sess->idle, ngx_min(sg_dlv.conf->idle_timeout,
                                           SG_DLV_NODE_WAIT));
        return;
    }

    sg_dlv_sess_close(sess);

    if (ngx_exiting) {
        sg_dlv_release();
    }
}


static void
sg_dlv_sess_idle_handler(ngx_event_t *ev)
{
    ngx_msec_t      elapsed;
    sg_dlv_sess_t  *sess;
    sg_dlv_dest_t  *dest;

    /* find the session whose timer this is */

    sess = (sg_dlv_sess_t *) ((u_char *) ev - offsetof(sg_dlv_sess_t, idle));
    dest = sess->dest;

    /*
     * sg_delivery_idle_timeout; before that, a worker waiting for the
     * room this connection holds on the node
     */

    elapsed = ngx_current_msec - sess->idle_since;

    if (elapsed < sg_dlv.conf->idle_timeout && !ngx_exiting
        && !(sess->node_counted
             && sg_node_yield(&dest->sn.str, sg_dlv.conf->dest_concurrency,
                              sg_dlv.conf->concurrency, 0)))
    {
        ngx_add_timer(&sess->idle,
                      ngx_min(sg_dlv.conf->idle_timeout - elapsed,
                              SG_DLV_NODE_WAIT));
        return;
    }

    sg_dlv_sess_idle_close(sess);
}


static void
sg_dlv_sess_idle_close(sg_dlv_sess_t *sess)
{
    ngx_queue_t    *q;
    sg_dlv_dest_t  *dest;

    dest = sess->dest;

    for (q = ngx_queue_head(&dest->idle);
         q != ngx_queue_sentinel(&dest->idle);
         q = ngx_queue_next(q))
    {
        if (q == &sess->link) {
            sg_dlv_sess_unidle(sess);
            break;
        }
    }

    sg_dlv_sess_close(sess);
}


/* an idle session leaves its destination's and the worker's idle lists */

static void
sg_dlv_sess_unidle(sg_dlv_sess_t *sess)
{
    ngx_queue_remove(&sess->link);
    ngx_queue_remove(&sess->idle_all);

    if (sess->idle.timer_set) {
        ngx_del_timer(&sess->idle);
    }
}


static void
sg_dlv_sess_close(sg_dlv_sess_t *sess)
{
    sg_dlv_dest_t  *dest;

    dest = sess->dest;

    if (sess->idle.timer_set) {
        ngx_del_timer(&sess->idle);
    }

    if (sess->client) {
        sg_client_close(sess->client);
    }

    sg_dlv_route_release(dest, sess->route, 1);

    dest->sessions--;
    sg_dlv.sessions--;

    if (sess->node_counted) {
        sg_node_release(&dest->sn.str, sg_dlv_connections());

    } else {
        sg_node_connections(sg_dlv_connections());
    }

    ngx_free(sess);

    if (!ngx_queue_empty(&dest->jobs)) {
        sg_dlv_dest_run(dest);

    } else {
        sg_dlv_dest_free(dest);
    }

    sg_dlv_run_waiting();
}


/* one row of delivery_attempts, and one line in the error log */

static void
sg_dlv_attempt(sg_dlv_sess_t *sess, sg_client_info_t *info,
    const char *result, const char *reply)
{
    ngx_uint_t     i;
    json_t        *row, *rcpts;
    sg_dlv_job_t  *job;
    u_char         text[SG_DLV_REPLY_MAX];

    job = sess->job;

    rcpts = json_array();
    row = json_object();

    if (rcpts == NULL || row == NULL) {
        json_decref(rcpts);
        json_decref(row);
        return;
    }

    /* the recipients this attempt was for (a 452 leaves some for the next) */

    if (job->txn) {
        for (i = 0; i < job->txn->nrcpts; i++) {
            json_array_append_new(rcpts,
                json_stringn((char *) job->txn->rcpts[i].address.data,
                             job->txn->rcpts[i].address.len));
        }

    } else {
        for (i = 0; i < job->nrcpts; i++) {
            if (job->rcpts[i].state == SG_RCPT_PENDING) {
                json_array_append_new(rcpts,
                    json_stringn((char *) job->rcpts[i].address.data,
                                 job->rcpts[i].address.len));
            }
        }
    }

    json_object_set_new(row, "recipients", rcpts);
    json_object_set_new(row, "started", json_real(sess->started
                                                  ? sess->started
                                                  : sg_dlv_now()));
    json_object_set_new(row, "ended", json_real(sg_dlv_now()));
    json_object_set_new(row, "destination",
                        json_stringn((char *) sess->dest->sn.str.data,
                                     sess->dest->sn.str.len));
    json_object_set_new(row, "mx_host",
                        json_stringn((char *) sess->host_name.data,
                                     sess->host_name.len));
    json_object_set_new(row, "ip", json_stringn((char *) sess->ip,
                                                sess->ip_len));
    json_object_set_new(row, "port",
                        json_integer(ngx_inet_get_port(sess->peer.sockaddr)));
    json_object_set_new(row, "tls_level",
                        json_string(sg_tls_level_name(sess->decision.level)));
    json_object_set_new(row, "tls_rule", json_integer(sess->decision.rule));
    json_object_set_new(row, "tls_reason",
                        json_string(sess->decision.reason
                                    ? sess->decision.reason : ""));
    ngx_cpystrn(text, (u_char *) (reply ? reply : ""), sizeof(text));
    sg_dlv_printable(text);

    json_object_set_new(row, "result", json_string(result));
    json_object_set_new(row, "reply", json_string((char *) text));

    json_object_set_new(row, "starttls", json_boolean(info && info->tls));

    if (info) {

        if (info->tls) {
            json_object_set_new(row, "tls_protocol",
                                json_string((char *) info->tls_protocol));
            json_object_set_new(row, "tls_cipher",
                                json_string((char *) info->tls_cipher));
            json_object_set_new(row, "tls_verify",
                                json_string((char *) info->tls_verify));
            json_object_set_new(row, "tls_host_match",
                                json_boolean(info->host_match));
        }

        if (info->result_type) {
            json_object_set_new(row, "tls_result_type",
                                json_string(info->result_type));
        }
    }

    sg_dlv_attempt_policy(sess, row);

    if (sess->decision.rule == 1) {
        json_object_set_new(row, "requirements",
                            sg_dlv_requirements(sess, info));
    }

    if (json_array_append_new(job->attempts, row) != 0) {
        return;
    }

    if (json_object_get(row, "reply") == NULL) {
        return;
    }

    ngx_log_error(NGX_LOG_INFO, sg_dlv.log, 0,
                  "sg delivery: %s to %V via %V[%*s]:%d tls=%s(%d)%s%s"
                  " %s: %s",
                  job->id, &job->rcpts[0].address, &sess->host_name,
                  sess->ip_len, sess->ip,
                  (int) ngx_inet_get_port(sess->peer.sockaddr),
                  sg_tls_level_name(sess->decision.level),
                  sess->decision.rule,
                  info && info->tls ? " " : "",
                  info && info->tls ? (char *) info->tls_protocol : "",
                  result, text);
}


/*
 * The policy of the attempt, for TLS reports (RFC 8460, 4.3): type, domain,
 * the MTA-STS policy's id, mode and text, and what failed of it.
 */

static void
sg_dlv_attempt_policy(sg_dlv_sess_t *sess, json_t *row)
{
    ngx_str_t        *domain;
    const char       *type, *result;
    sg_sts_answer_t  *a;
    u_char            reason[SG_DLV_REPLY_MAX];

    a = sess->dest->sts;
    domain = sg_dlv_policy_domain(sess->dest);
    type = "no-policy-found";
    result = NULL;

    if (a && (a->mode != SG_STS_NONE || a->result_type)) {
        type = "sts";
        domain = &a->domain;
        result = a->result_type;

        if (result) {
            json_object_set_new(row, "policy_reason",
                                json_string(a->reason));
        }

        if (a->mode != SG_STS_NONE) {
            json_object_set_new(row, "policy_id",
                                json_stringn((char *) a->id.data, a->id.len));
            json_object_set_new(row, "policy_mode",
                                json_string(a->mode == SG_STS_ENFORCE
                                            ? "enforce" : "testing"));
            json_object_set_new(row, "policy_text",
                                json_stringn((char *) a->text.data,
                                             a->text.len));
        }

        if (sess->sts_mismatch) {
            /* RFC 8460, 4.3.2.2: the MX does not match the policy */
            result = "validation-failure";
            ngx_snprintf(reason, sizeof(reason) - 1,
                             "mx-mismatch: %V is not in the mx list of the"
                             " policy of %V%Z", &sess->host_name, &a->domain);
            sg_dlv_printable(reason);
            json_object_set_new(row, "policy_reason",
                                json_string((char *) reason));
        }
    }

    json_object_set_new(row, "policy_type", json_string(type));
    json_object_set_new(row, "policy_domain",
                        json_stringn((char *) domain->data, domain->len));

    if (result) {
        json_object_set_new(row, "policy_result_type", json_string(result));
    }
}


/*
 * RFC 8689, 4.1: each requirement for a flagged message, at this host:
 * "ok", "failed" or "not reached"; the queue entry shows them.
 */

static json_t *
sg_dlv_requirements(sg_dlv_sess_t *sess, sg_client_info_t *info)
{
    json_t            *o;
    const char        *mx, *tls, *cert, *kw;

    o = json_object();
    if (o == NULL) {
        return NULL;
    }

    if (sess->decision.skip) {
        mx = "failed";

    } else if (sess->dest->relay) {
        mx = "ok: a configured host, not from MX";

    } else if (sess->route->mx_secure) {
        mx = "ok: DNSSEC-signed MX answer";

    } else {
        mx = "ok: MTA-STS policy in enforce mode";
    }

    tls = "not reached";
    cert = "not reached";
    kw = "not reached";

    if (info && !sess->decision.skip) {
        if (info->tls) {
            tls = "ok";
            cert = (info->step == SG_CLIENT_VERIFY) ? "failed" : "ok";

            if (info->requiretls) {
                kw = "ok";

            } else if (!sess->decision.need_requiretls) {
                kw = "not offered: the internal server is trusted";

            } else if (info->step == SG_CLIENT_NO_REQUIRETLS
                       || info->step == SG_CLIENT_OK)
            {
                kw = "failed";
            }

        } else if (info->step == SG_CLIENT_HANDSHAKE && info->transient) {
            tls = "not completed (transient)";

        } else if (info->step == SG_CLIENT_STARTTLS
                   && info->reply.code < 500)
        {
            tls = "refused (transient)";

        } else if (info->step == SG_CLIENT_NO_STARTTLS
                   || info->step == SG_CLIENT_STARTTLS
                   || info->step == SG_CLIENT_HANDSHAKE)
        {
            tls = "failed";
        }
    }

    json_object_set_new(o, "mx_validated", json_string(mx));
    json_object_set_new(o, "starttls", json_string(tls));
    json_object_set_new(o, "certificate", json_string(cert));
    json_object_set_new(o, "requiretls_offered", json_string(kw));

    return o;
}


static void
sg_dlv_rcpt_reply(sg_dlv_job_t *job, sg_dlv_rcpt_t *r,
    sg_client_reply_t *reply, ngx_str_t *remote, ngx_uint_t dsn_peer)
{
    sg_dlv_rcpt_outcome(job, r, reply->code,
                        reply->status[0] ? (char *) reply->status : NULL,
                        (char *) reply->text, remote, dsn_peer);
}


static unsigned
sg_dlv_notify_bits(ngx_str_t *notify)
{
    unsigned  bits;

    if (notify->len == 0) {
        return 0;
    }

    bits = 0;

    if (ngx_strlcasestrn(notify->data, notify->data + notify->len,
                         (u_char *) "NEVER", 5 - 1))
    {
        bits |= SG_DSN_NOTIFY_NEVER;
    }

    if (ngx_strlcasestrn(notify->data, notify->data + notify->len,
                         (u_char *) "SUCCESS", 7 - 1))
    {
        bits |= SG_DSN_NOTIFY_SUCCESS;
    }

    if (ngx_strlcasestrn(notify->data, notify->data + notify->len,
                         (u_char *) "FAILURE", 7 - 1))
    {
        bits |= SG_DSN_NOTIFY_FAILURE;
    }

    if (ngx_strlcasestrn(notify->data, notify->data + notify->len,
                         (u_char *) "DELAY", 5 - 1))
    {
        bits |= SG_DSN_NOTIFY_DELAY;
    }

    return bits;
}


/*
 * The outcome of one recipient (r == NULL: of every pending one) from a
 * reply code: 2xx delivered, 5xx bounced, 4xx deferred on the retry
 * schedule until the maximum queue lifetime, then bounced (4.4.7).
 */

static void
sg_dlv_rcpt_outcome(sg_dlv_job_t *job, sg_dlv_rcpt_t *r, ngx_uint_t code,
    const char *status, const char *text, ngx_str_t *remote,
    ngx_uint_t dsn_peer)
{
    time_t           age;
    ngx_uint_t       i, n;
    sg_dsn_action_e  action;

    if (r == NULL) {
        for (i = 0; i < job->nrcpts; i++) {
            if (job->rcpts[i].state == SG_RCPT_PENDING) {
                sg_dlv_rcpt_outcome(job, &job->rcpts[i], code, status,
                                    text, remote, dsn_peer);
            }
        }

        return;
    }

    if (remote) {
        /*
         * a copy: the host name lives in the destination's DNS answer,
         * which may be gone when the results are recorded (PostgreSQL
         * away for a while)
         */
        r->remote.data = ngx_pnalloc(job->pool, remote->len);
        r->remote.len = r->remote.data ? remote->len : 0;

        if (r->remote.data) {
            ngx_memcpy(r->remote.data, remote->data, remote->len);
        }
    }

    ngx_cpystrn(r->reply, (u_char *) text, sizeof(r->reply));
    sg_dlv_printable(r->reply);

    if (status) {
        ngx_cpystrn(r->status, (u_char *) status, sizeof(r->status));
        sg_dlv_printable(r->status);

    } else {
        ngx_snprintf(r->status, sizeof(r->status) - 1, "%d.0.0%Z",
                     (int) (code / 100));
    }

    if (code >= 200 && code < 300) {
        r->state = SG_RCPT_DELIVERED;

        /*
         * RFC 3461, 6.2.1: a next hop that supports DSN reports success
         * itself; to one that does not, sg says "relayed"
         */
        action = dsn_peer ? SG_DSN_DELIVERED : SG_DSN_RELAYED;
        r->action = dsn_peer ? "delivered" : "relayed";
        r->dsn_due = !dsn_peer
                     && sg_dsn_wanted(sg_dlv_cstr(job->pool, &job->sender),
                                      sg_dlv_notify_bits(&r->notify),
                                      action);
        return;
    }

    age = ngx_time() - job->received;

    if (code >= 400 && code < 500 && age < sg_dlv.conf->max_lifetime) {
        r->state = SG_RCPT_DEFERRED;
        r->action = NULL;
        r->dsn_due = 0;
        return;
    }

    if (code >= 400 && code < 500) {
        /* RFC 3463, 3.5: 4.4.7, delivery time expired */
        n = ngx_snprintf(r->reply, sizeof(r->reply) - 1,
                         "the message expired in the queue after %T"
                         " seconds; the last try said: %s",
                         age, text) - r->reply;
        r->reply[n] = '\0';
        ngx_cpystrn(r->status, (u_char *) "4.4.7", sizeof(r->status));
    }

    r->state = SG_RCPT_BOUNCED;
    r->action = "failed";
    r->dsn_due = sg_dsn_wanted(sg_dlv_cstr(job->pool, &job->sender),
                               sg_dlv_notify_bits(&r->notify),
                               SG_DSN_FAILED);
}


static void
sg_dlv_job_finish(sg_dlv_job_t *job)
{
    sg_dlv_rcpt_outcome(job, NULL, 451, "4.3.0",
                        "delivery ended without a result", NULL, 0);

    sg_dlv_job_record(job);
}


static time_t
sg_dlv_retry_in(sg_dlv_job_t *job, sg_dlv_rcpt_t *r)
{
    time_t         delay, left;
    ngx_uint_t     step;
    sg_dlv_conf_t  *dcf;

    dcf = sg_dlv.conf;

    if (job->lapsed) {
        /* not sent for sg's own reason: no attempt to wait for */
        return 0;
    }

    step = r->attempts ? r->attempts - 1 : 0;
    if (step >= dcf->nschedule) {
        step = dcf->nschedule - 1;
    }

    delay = dcf->schedule[step];

    /* the last try at the end of the queue lifetime */
    left = job->received + dcf->max_lifetime - ngx_time();
    if (left < delay) {
        delay = left > 1 ? left : 1;
    }

    return delay;
}


/*
 * Group commit of results: while a results statement runs, the jobs that
 * finish meanwhile wait and are recorded together, in one statement.
 */

static struct {
    ngx_queue_t          waiting;            /* sg_dlv_job_t.record */
    ngx_uint_t           running;
    unsigned             init:1;
} sg_dlv_rec;


typedef struct {
    ngx_uint_t           n;
    sg_dlv_job_t        *jobs[SG_DLV_RECORD_BATCH];
    u_char               ids[SG_DLV_RECORD_BATCH * 17 + 2];  /* {ID,...} */
} sg_dlv_record_batch_t;


static void
sg_dlv_job_record(sg_dlv_job_t *job)
{
    if (!sg_dlv_rec.init) {
        ngx_queue_init(&sg_dlv_rec.waiting);
        sg_dlv_rec.init = 1;
    }

    job->recording = 1;

    if (sg_dlv_rec.running < SG_DLV_RECORD_RUNNING) {
        sg_dlv_job_record_alone(job);
        return;
    }

    /* a results statement runs: its handler sends these */
    ngx_queue_insert_tail(&sg_dlv_rec.waiting, &job->record);
}


static void
sg_dlv_job_record_alone(sg_dlv_job_t *job)
{
    if (sg_dlv_record_batch(&job, 1) == NGX_OK) {
        return;
    }

    ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                  "sg delivery: %s: cannot record the results now,"
                  " trying again", job->id);

    sg_dlv_job_retry_later(job);
}


/* the recipients' rows of one job, appended to rows */

static ngx_int_t
sg_dlv_job_rows(sg_dlv_job_t *job, json_t *rows)
{
    json_t         *row;
    ngx_uint_t      i;
    sg_dlv_rcpt_t  *r;

    static const char  *states[] = { "deferred", "delivered", "deferred",
                                     "bounced" };

    for (i = 0; i < job->nrcpts; i++) {
        r = &job->rcpts[i];

        row = json_pack("{s:I, s:s, s:s, s:s, s:s?, s:s%, s:I, s:b}",
                        "id", (json_int_t) r->id,
                        "state", states[r->state],
                        "reply", (char *) r->reply,
                        "status", (char *) r->status,
                        "action", r->action,
                        "remote", r->remote.data ? (char *) r->remote.data
                                                 : "",
                        r->remote.len,
                        "retry_in", (json_int_t) sg_dlv_retry_in(job, r),
                        "dsn_due", (int) r->dsn_due);

        if (row == NULL || json_array_append_new(rows, row) != 0) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* lo and hi widened to the job's recipient ids */

static void
sg_dlv_job_span(sg_dlv_job_t *job, int64_t *lo, int64_t *hi)
{
    ngx_uint_t  i;

    for (i = 0; i < job->nrcpts; i++) {
        *lo = ngx_min(*lo, job->rcpts[i].id);
        *hi = ngx_max(*hi, job->rcpts[i].id);
    }
}


/* record the job again soon; the handler finds its job through the event */

static void
sg_dlv_job_retry_later(sg_dlv_job_t *job)
{
    job->retry.handler = sg_dlv_job_retry_handler;
    job->retry.data = &sg_dlv.dummy;
    job->retry.log = sg_dlv.log;
    ngx_add_timer(&job->retry, SG_DLV_RECORD_RETRY);
}


static void
sg_dlv_job_retry_handler(ngx_event_t *ev)
{
    sg_dlv_job_t  *job;

    job = (sg_dlv_job_t *) ((u_char *) ev - offsetof(sg_dlv_job_t, retry));

    if (ngx_exiting && ++job->retries > 60) {
        /* the lease brings the recipients back */
        ngx_log_error(NGX_LOG_ERR, sg_dlv.log, 0,
                      "sg delivery: %s: results not recorded before"
                      " shutdown; the recipients are tried again after their"
                      " lease (they may be delivered twice)", job->id);
        sg_dlv_job_free(job);
        return;
    }

    sg_dlv_job_record(job);
}


/* after a results statement: the jobs that waited for it go, together */

static void
sg_dlv_record_next(void)
{
    int64_t        lo, hi, jlo, jhi;
    ngx_uint_t     i, n;
    ngx_queue_t   *q, *next;
    sg_dlv_job_t  *job, *jobs[SG_DLV_RECORD_BATCH];

    while (sg_dlv_rec.running < SG_DLV_RECORD_RUNNING
           && !ngx_queue_empty(&sg_dlv_rec.waiting))
    {
        /* the first waiting job, and those whose ids keep the range short */

        n = 0;
        lo = 0;
        hi = 0;

        for (q = ngx_queue_head(&sg_dlv_rec.waiting);
             q != ngx_queue_sentinel(&sg_dlv_rec.waiting)
             && n < SG_DLV_RECORD_BATCH;
             q = next)
        {
            next = ngx_queue_next(q);
            job = ngx_queue_data(q, sg_dlv_job_t, record);

            jlo = job->rcpts[0].id;
            jhi = jlo;
            sg_dlv_job_span(job, &jlo, &jhi);

            if (n && (ngx_max(hi, jhi) - ngx_min(lo, jlo)
                      > SG_DLV_RECORD_SPAN))
            {
                continue;
            }

            lo = n ? ngx_min(lo, jlo) : jlo;
            hi = n ? ngx_max(hi, jhi) : jhi;

            ngx_queue_remove(q);
            jobs[n++] = job;
        }

        if (n == 1 || sg_dlv_record_batch(jobs, n) != NGX_OK) {
            for (i = 0; i < n; i++) {
                sg_dlv_job_record_alone(jobs[i]);
            }
        }
    }
}


/* one results statement for n jobs (n may be 1) */

static ngx_int_t
sg_dlv_record_batch(sg_dlv_job_t **jobs, ngx_uint_t n)
{
    char                   *rj, *aj;
    u_char                 *p;
    json_t                 *rows, *attempts, *a;
    size_t                  k;
    int64_t                 lo, hi;
    ngx_int_t               rc;
    ngx_uint_t              i;
    const char             *params[6];
    sg_dlv_record_batch_t  *b;
    char                    min[NGX_INT64_LEN + 1], max[NGX_INT64_LEN + 1];

    b = ngx_alloc(sizeof(sg_dlv_record_batch_t), sg_dlv.log);
    if (b == NULL) {
        return NGX_ERROR;
    }

    rows = json_array();
    attempts = json_array();
    rc = (rows && attempts) ? NGX_OK : NGX_ERROR;

    lo = jobs[0]->rcpts[0].id;
    hi = lo;

    /* the message ids as a text[] literal: {ID,ID,...} (hex digits) */

    b->n = n;
    p = ngx_cpymem(b->ids, "{", 1);

    for (i = 0; rc == NGX_OK && i < n; i++) {
        b->jobs[i] = jobs[i];
        p = ngx_sprintf(p, "%s%s", i ? "," : "", jobs[i]->id);

        sg_dlv_job_span(jobs[i], &lo, &hi);

        if (sg_dlv_job_rows(jobs[i], rows) != NGX_OK) {
            rc = NGX_ERROR;
            break;
        }

        json_array_foreach(jobs[i]->attempts, k, a) {
            if (json_object_set_new(a, "message_id",
                                    json_string((char *) jobs[i]->id))
                != 0
                || json_array_append(attempts, a) != 0)
            {
                rc = NGX_ERROR;
                break;
            }
        }
    }

    *p++ = '}';
    *p = '\0';

    rj = (rc == NGX_OK) ? json_dumps(rows, JSON_COMPACT) : NULL;
    aj = (rc == NGX_OK) ? json_dumps(attempts, JSON_COMPACT) : NULL;
    json_decref(rows);
    json_decref(attempts);

    if (rj == NULL || aj == NULL) {
        free(rj);
        free(aj);
        ngx_free(b);
        return NGX_ERROR;
    }

    *ngx_sprintf((u_char *) min, "%L", lo) = '\0';
    *ngx_sprintf((u_char *) max, "%L", hi) = '\0';

    params[0] = rj;
    params[1] = sg_dlv.worker_id;
    params[2] = (char *) b->ids;
    params[3] = aj;
    params[4] = min;
    params[5] = max;

    rc = sg_pg_exec(sg_worker.pg, &sg_dlv_record_stmt, 6, params,
                    sg_dlv_record_batch_done, b);

    free(rj);
    free(aj);

    if (rc != NGX_OK) {
        ngx_free(b);
        return NGX_ERROR;
    }

    sg_dlv_rec.running++;

    return NGX_OK;
}


static void
sg_dlv_record_batch_done(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    sg_dlv_record_batch_t  *b = data;

    ngx_uint_t  i, alone;

    sg_dlv_rec.running--;
    sg_dlv_record_next();

    /*
     * An error of the server rolled the whole batch back: each job is
     * recorded again alone (sg_dlv_job_recorded handles refused attempt
     * rows per job).  After a lost connection or a timeout each job tries
     * again later, as a single statement would.
     */

    alone = b->n > 1 && sg_pg_refused(err, sqlstate);

    if (alone) {
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: cannot record the results of %ui jobs"
                      " together, recording each alone: %s", b->n, err);
    }

    for (i = 0; i < b->n; i++) {
        if (alone) {
            sg_dlv_job_record_alone(b->jobs[i]);

        } else {
            sg_dlv_job_recorded(b->jobs[i], res, err, sqlstate);
        }
    }

    ngx_free(b);
}


static void
sg_dlv_job_recorded(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    sg_dlv_job_t  *job = data;

    ngx_uint_t  i, dsn;

    if (err) {
        if (sqlstate && (ngx_strncmp(sqlstate, "22", 2) == 0
                         || ngx_strncmp(sqlstate, "23", 2) == 0)
            && json_array_size(job->attempts))
        {
            /*
             * the attempt rows themselves are refused (a bug): the
             * recipients' results must not wait for them forever
             */
            ngx_log_error(NGX_LOG_ERR, sg_dlv.log, 0,
                          "sg delivery: %s: the attempt rows are refused,"
                          " recording the results without them: %s",
                          job->id, err);
            json_array_clear(job->attempts);

        } else {
            ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                          "sg delivery: %s: cannot record the results: %s",
                          job->id, err);
        }

        sg_dlv_job_retry_later(job);
        return;
    }

    for (i = 0; i < (ngx_uint_t) PQntuples(res); i++) {
        if (ngx_strcmp(PQgetvalue(res, i, 0), job->id) == 0) {
            break;
        }
    }

    if (i == (ngx_uint_t) PQntuples(res)) {
        /* the claim ran out meanwhile and another worker took it */
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: %s: results not recorded: the claim"
                      " ran out before they could be written (PostgreSQL"
                      " was unavailable); its recipients are delivered"
                      " again", job->id);
    }

    dsn = 0;

    for (i = 0; i < job->nrcpts; i++) {
        dsn |= job->rcpts[i].dsn_due;
    }

    sg_dlv_job_free(job);

    if (dsn) {
        sg_dlv_dsn_sweep();
    }

    if (sg_dlv.again || sg_dlv.jobs < sg_dlv.conf->batch / 2) {
        sg_dlv_claim();
    }
}


static void
sg_dlv_job_free(sg_dlv_job_t *job)
{
    ngx_queue_t    *q;
    sg_dlv_sess_t  *sess;

    sg_dlv.bodies -= job->body_len;
    ngx_queue_remove(&job->all);

    json_decref(job->attempts);
    ngx_destroy_pool(job->pool);
    sg_dlv.jobs--;

    /* sessions waiting for sg_delivery_memory, in order, while it fits */

    while (!ngx_queue_empty(&sg_dlv.body_waiting) && !ngx_exiting) {
        q = ngx_queue_head(&sg_dlv.body_waiting);
        sess = ngx_queue_data(q, sg_dlv_sess_t, link);

        if (sg_dlv.bodies
            && sg_dlv.bodies + (size_t) sess->job->size
               > sg_dlv.conf->memory)
        {
            break;
        }

        ngx_queue_remove(q);
        sg_dlv_sess_body(sess);
    }
}


/*
 * Shutting down: jobs that have not started go back to the queue now
 * (those that have, finish: their timers keep the worker alive).
 */

static void
sg_dlv_release(void)
{
    u_char          *p, *last;
    size_t           k;
    ngx_uint_t       n;
    ngx_queue_t     *q;
    ngx_rbtree_node_t *node;
    sg_dlv_job_t    *job;
    sg_dlv_dest_t   *dest;
    sg_dlv_sess_t   *sess;
    const char      *params[2];
    u_char          *ids;
    size_t           size;

    if (sg_dlv.released || sg_dlv.dests.root == sg_dlv.dests.sentinel) {
        return;
    }

    /* sessions waiting for memory have not started: their jobs go too */

    while (!ngx_queue_empty(&sg_dlv.body_waiting)) {
        q = ngx_queue_head(&sg_dlv.body_waiting);
        sess = ngx_queue_data(q, sg_dlv_sess_t, link);
        ngx_queue_remove(q);

        ngx_queue_insert_head(&sess->dest->jobs, &sess->job->link);
        sess->dest->njobs++;
        sess->job = NULL;
        sg_dlv_sess_close(sess);
    }

    if (sg_dlv.dests.root == sg_dlv.dests.sentinel) {
        return;
    }

    n = 0;
    size = 2;

    for (node = ngx_rbtree_min(sg_dlv.dests.root, sg_dlv.dests.sentinel);
         node;
         node = ngx_rbtree_next(&sg_dlv.dests, node))
    {
        dest = (sg_dlv_dest_t *) node;

        for (q = ngx_queue_head(&dest->jobs);
             q != ngx_queue_sentinel(&dest->jobs);
             q = ngx_queue_next(q))
        {
            job = ngx_queue_data(q, sg_dlv_job_t, link);
            n += job->nrcpts;
        }
    }

    if (n == 0) {
        return;
    }

    sg_dlv.released = 1;
    size += n * (NGX_INT64_LEN + 1) + 1;

    ids = ngx_alloc(size, sg_dlv.log);
    if (ids == NULL) {
        return;
    }

    p = ids;
    last = ids + size;
    *p++ = '{';
    k = 0;

    node = ngx_rbtree_min(sg_dlv.dests.root, sg_dlv.dests.sentinel);

    while (node) {
        dest = (sg_dlv_dest_t *) node;
        node = ngx_rbtree_next(&sg_dlv.dests, node);

        while (!ngx_queue_empty(&dest->jobs)) {
            q = ngx_queue_head(&dest->jobs);
            job = ngx_queue_data(q, sg_dlv_job_t, link);
            ngx_queue_remove(q);
            dest->njobs--;

            p = sg_dlv_rcpt_ids(p, last, job, 0, &k);
            sg_dlv_job_free(job);
        }

        sg_dlv_dest_free(dest);
    }

    p = ngx_slprintf(p, last, "}%Z");

    params[0] = (char *) ids;
    params[1] = sg_dlv.worker_id;

    ngx_log_error(NGX_LOG_NOTICE, sg_dlv.log, 0,
                  "sg delivery: shutting down, %ui waiting recipients go"
                  " back to the queue", n);

    (void) sg_pg_exec(sg_worker.pg, &sg_dlv_release_stmt, 2, params,
                      sg_dlv_released, NULL);

    ngx_free(ids);
}


static void
sg_dlv_released(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    if (err) {
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: cannot release waiting recipients (their"
                      " claims run out instead): %s", err);
    }
}


/*
 * The hourly TLS-failure list (rule 6): Redis keys sg:tls-failure:<host>
 * expiring at the next full period (redis/README.md), and a copy in this
 * worker's memory that also serves while Redis is down.
 */

static void
sg_dlv_failure_check(sg_dlv_sess_t *sess)
{
    u_char      key[sizeof(SG_DLV_FAILURE_KEY) + 256];
    u_char     *p;
    size_t      len;
    const char *argv[2];
    size_t      argvlen[2];

    if (sg_dlv_failure_memory(&sess->host_name, 0, 0)) {
        sg_dlv_sess_failure_listed(sess, 1);
        return;
    }

    if (sg_worker.redis == NULL || sess->host_name.len > 255) {
        sg_dlv_sess_failure_listed(sess, 0);
        return;
    }

    p = ngx_cpymem(key, SG_DLV_FAILURE_KEY, sizeof(SG_DLV_FAILURE_KEY) - 1);
    len = sess->host_name.len;
    ngx_strlow(p, sess->host_name.data, len);
    p += len;

    argv[0] = "GET";
    argvlen[0] = 3;
    argv[1] = (char *) key;
    argvlen[1] = p - key;

    if (sg_redis_command_argv(sg_worker.redis, sg_dlv_failure_got, sess, 2,
                              argv, argvlen)
        != NGX_OK)
    {
        sg_dlv_sess_failure_listed(sess, 0);
    }
}


static void
sg_dlv_failure_got(void *data, redisReply *reply, const char *err)
{
    sg_dlv_sess_t  *sess = data;

    if (err) {
        ngx_log_error(NGX_LOG_NOTICE, sg_dlv.log, 0,
                      "sg delivery: Redis is unavailable (%s): the"
                      " TLS-failure list is this worker's memory meanwhile",
                      err);
        sg_dlv_sess_failure_listed(sess, 0);
        return;
    }

    sg_dlv_sess_failure_listed(sess, reply->type == REDIS_REPLY_STRING);
}


static void
sg_dlv_failure_add(sg_dlv_sess_t *sess, const char *reason)
{
    u_char      key[sizeof(SG_DLV_FAILURE_KEY) + 256];
    u_char      exat[NGX_TIME_T_LEN + 1];
    u_char     *p;
    char       *value;
    json_t     *v;
    time_t      now, expires;
    struct tm   tm;
    char        failed_at[32], expires_at[32];
    const char *argv[5];
    size_t      argvlen[5];

    now = ngx_time();
    expires = (now / sg_dlv.conf->tls_failure_period + 1)
              * sg_dlv.conf->tls_failure_period;

    (void) sg_dlv_failure_memory(&sess->host_name, 1, expires);

    if (sess->host_name.len > 255) {
        return;
    }

    ngx_libc_gmtime(now, &tm);
    strftime(failed_at, sizeof(failed_at), "%Y-%m-%dT%H:%M:%SZ", &tm);
    ngx_libc_gmtime(expires, &tm);
    strftime(expires_at, sizeof(expires_at), "%Y-%m-%dT%H:%M:%SZ", &tm);

    if (sg_worker.redis == NULL || !sg_redis_up(sg_worker.redis)) {
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: Redis is unavailable: \"%V\" is on the"
                      " TLS-failure list in this worker's memory until %s",
                      &sess->host_name, expires_at);
        return;
    }

    p = ngx_cpymem(key, SG_DLV_FAILURE_KEY, sizeof(SG_DLV_FAILURE_KEY) - 1);
    ngx_strlow(p, sess->host_name.data, sess->host_name.len);
    p += sess->host_name.len;

    v = json_pack("{s:s%, s:s%, s:s, s:s, s:s}",
                  "host", (char *) sess->host_name.data, sess->host_name.len,
                  "ip", (char *) sess->ip, sess->ip_len,
                  "reason", reason,
                  "failed_at", failed_at,
                  "expires_at", expires_at);
    value = v ? json_dumps(v, JSON_COMPACT) : NULL;
    json_decref(v);

    if (value == NULL) {
        return;
    }

    ngx_sprintf(exat, "%T%Z", expires);

    argv[0] = "SET";
    argvlen[0] = 3;
    argv[1] = (char *) key;
    argvlen[1] = p - key;
    argv[2] = value;
    argvlen[2] = ngx_strlen(value);
    argv[3] = "EXAT";
    argvlen[3] = 4;
    argv[4] = (char *) exat;
    argvlen[4] = ngx_strlen(exat);

    if (sg_redis_command_argv(sg_worker.redis, sg_dlv_failure_set, NULL, 5,
                              argv, argvlen)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: Redis is unavailable: \"%V\" is on the"
                      " TLS-failure list in this worker's memory until %s",
                      &sess->host_name, expires_at);
    }

    free(value);
}


static void
sg_dlv_failure_set(void *data, redisReply *reply, const char *err)
{
    if (err) {
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: cannot add to the TLS-failure list in"
                      " Redis (%s): it is kept in this worker's memory", err);
    }
}


/* look up (add == 0) or add a host in the in-memory list */

static ngx_uint_t
sg_dlv_failure_memory(ngx_str_t *host, ngx_uint_t add, time_t expires)
{
    time_t             now;
    ngx_uint_t         i;
    sg_dlv_failure_t  *f, *free_slot;

    now = ngx_time();
    f = sg_dlv.failures->elts;
    free_slot = NULL;

    for (i = 0; i < sg_dlv.failures->nelts; i++) {

        if (f[i].expires <= now) {
            if (free_slot == NULL && f[i].host.len >= host->len) {
                free_slot = &f[i];
            }

            continue;
        }

        if (f[i].host.len == host->len
            && ngx_strncasecmp(f[i].host.data, host->data, host->len) == 0)
        {
            if (add) {
                f[i].expires = expires;
            }

            return 1;
        }
    }

    if (!add) {
        return 0;
    }

    if (free_slot == NULL) {
        if (sg_dlv.failures->nelts >= 10000) {
            return 0;
        }

        free_slot = ngx_array_push(sg_dlv.failures);
        if (free_slot == NULL) {
            return 0;
        }

        free_slot->host.data = ngx_pnalloc(sg_dlv.failures_pool, host->len);
        if (free_slot->host.data == NULL) {
            free_slot->expires = 0;
            free_slot->host.len = 0;
            return 0;
        }
    }

    ngx_memcpy(free_slot->host.data, host->data, host->len);
    free_slot->host.len = host->len;
    free_slot->expires = expires;

    return 1;
}


/*
 * DSNs: one per message once none of its recipients is pending (and delay
 * notices); one message at a time per worker.
 */

static u_char       sg_dlv_dsn_ids[SG_DLV_DSN_BATCH][17];
static ngx_uint_t   sg_dlv_dsn_n;
static ngx_uint_t   sg_dlv_dsn_i;
static ngx_pool_t  *sg_dlv_dsn_pool;


static void
sg_dlv_dsn_sweep(void)
{
    char         age[NGX_TIME_T_LEN + 1];
    const char  *params[1];

    if (!sg_dlv.running) {
        return;
    }

    if (sg_dlv.dsn_running) {
        sg_dlv.dsn_again = 1;
        return;
    }

    ngx_snprintf((u_char *) age, sizeof(age) - 1, "%T%Z",
                 sg_dlv.conf->delay_notice);
    params[0] = age;

    if (sg_pg_query(sg_worker.pg, SG_DLV_DSN_FIND_SQL, 1, params,
                    sg_dlv_dsn_found, NULL)
        == NGX_OK)
    {
        sg_dlv.dsn_running = 1;
        sg_dlv.dsn_again = 0;
    }
}


static void
sg_dlv_dsn_found(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    int  i, n;

    if (err) {
        sg_dlv.dsn_running = 0;
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: cannot look for due DSNs: %s", err);
        return;
    }

    n = PQntuples(res);
    sg_dlv_dsn_n = 0;
    sg_dlv_dsn_i = 0;

    for (i = 0; i < n && i < SG_DLV_DSN_BATCH; i++) {
        if (PQgetlength(res, i, 0) == 16) {
            ngx_memcpy(sg_dlv_dsn_ids[sg_dlv_dsn_n], PQgetvalue(res, i, 0),
                       16);
            sg_dlv_dsn_ids[sg_dlv_dsn_n++][16] = '\0';
        }
    }

    if (n == SG_DLV_DSN_BATCH) {
        sg_dlv.dsn_again = 1;
    }

    sg_dlv_dsn_next();
}


static void
sg_dlv_dsn_next(void)
{
    char         until[NGX_TIME_T_LEN + 1], age[NGX_TIME_T_LEN + 1];
    char         prefix[NGX_SIZE_T_LEN + 1];
    const char  *params[4];

    if (sg_dlv_dsn_pool) {
        ngx_destroy_pool(sg_dlv_dsn_pool);
        sg_dlv_dsn_pool = NULL;
    }

    while (sg_dlv_dsn_i < sg_dlv_dsn_n && sg_dlv.running) {

        ngx_snprintf((u_char *) until, sizeof(until) - 1, "%T%Z",
                     sg_dlv.conf->max_lifetime);
        ngx_snprintf((u_char *) age, sizeof(age) - 1, "%T%Z",
                     sg_dlv.conf->delay_notice);
        ngx_snprintf((u_char *) prefix, sizeof(prefix) - 1, "%uz%Z",
                     (size_t) SG_DLV_DSN_ORIGINAL_MAX);

        params[0] = (char *) sg_dlv_dsn_ids[sg_dlv_dsn_i++];
        params[1] = until;
        params[2] = age;
        params[3] = prefix;

        if (sg_pg_query(sg_worker.pg, SG_DLV_DSN_LOAD_SQL, 4, params,
                        sg_dlv_dsn_loaded, NULL)
            == NGX_OK)
        {
            return;
        }
    }

    sg_dlv.dsn_running = 0;

    if (sg_dlv.dsn_again) {
        sg_dlv_dsn_sweep();
    }
}


static sg_dsn_action_e
sg_dlv_dsn_action(const char *a)
{
    if (a == NULL || ngx_strcmp(a, "failed") == 0) {
        return SG_DSN_FAILED;
    }

    if (ngx_strcmp(a, "delayed") == 0) {
        return SG_DSN_DELAYED;
    }

    if (ngx_strcmp(a, "relayed") == 0) {
        return SG_DSN_RELAYED;
    }

    return SG_DSN_DELIVERED;
}


static void
sg_dlv_dsn_loaded(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    u_char            *p, *body, *buf, *orig;
    char              *at, *host, *sender;
    size_t             body_len, n, final_len, delay_len, rlen;
    json_t            *rows, *row;
    sg_lists_t        *l;
    ngx_str_t          ns, dom;
    ngx_uint_t         i, nrows, nfinal, ndelay;
    ngx_pool_t        *pool;
    sg_str_t           xin;
    sg_dsn_t           dsn;
    sg_dsn_rc_e        rc;
    sg_dsn_rcpt_t     *rcpts;
    sg_dsn_result_t    result;
    sg_pg_param_t      params[13];
    u_char             rnd[8];
    char              *final_ids, *delay_ids, *sizes, *counts, *id;
    const char        *orcpt, *semi;

    orig = sg_dlv_dsn_ids[sg_dlv_dsn_i - 1];

    if (err || PQntuples(res) != 1) {
        if (err) {
            ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                          "sg delivery: %s: cannot load for a DSN: %s",
                          orig, err);
        }

        sg_dlv_dsn_next();
        return;
    }

    pool = ngx_create_pool(4096, sg_dlv.log);
    if (pool == NULL) {
        sg_dlv_dsn_next();
        return;
    }

    sg_dlv_dsn_pool = pool;

    rows = json_loads(PQgetvalue(res, 0, 6), 0, NULL);
    nrows = json_is_array(rows) ? json_array_size(rows) : 0;

    if (nrows == 0) {
        json_decref(rows);
        sg_dlv_dsn_next();
        return;
    }

    body = PQunescapeBytea((u_char *) PQgetvalue(res, 0, 5), &body_len);
    rcpts = ngx_pcalloc(pool, nrows * sizeof(sg_dsn_rcpt_t));
    final_ids = ngx_pnalloc(pool, nrows * (NGX_INT64_LEN + 1) + 3);
    delay_ids = ngx_pnalloc(pool, nrows * (NGX_INT64_LEN + 1) + 3);

    if (body == NULL || rcpts == NULL || final_ids == NULL
        || delay_ids == NULL)
    {
        goto failed;
    }

    final_len = 0;
    delay_len = 0;
    nfinal = 0;
    ndelay = 0;
    final_ids[final_len++] = '{';
    delay_ids[delay_len++] = '{';

    for (i = 0; i < nrows; i++) {
        row = json_array_get(rows, i);

        rcpts[i].address = json_string_value(json_object_get(row, "address"));
        rcpts[i].action = sg_dlv_dsn_action(
                            json_string_value(json_object_get(row, "action")));
        rcpts[i].status = json_string_value(json_object_get(row, "status"));
        rcpts[i].remote_mta = json_string_value(json_object_get(row,
                                                                "remote"));
        rcpts[i].diagnostic = json_string_value(json_object_get(row,
                                                                "reply"));
        rcpts[i].last_attempt = (time_t) json_integer_value(
                                          json_object_get(row, "when"));

        if (rcpts[i].action == SG_DSN_DELAYED) {
            rcpts[i].retry_until = (time_t) json_integer_value(
                                              json_object_get(row, "until"));
        }

        if (rcpts[i].diagnostic && rcpts[i].remote_mta == NULL) {
            /* sg's own reason, not a remote reply */
            rcpts[i].diagnostic_type = "X-sg";
        }

        ns.data = (u_char *) json_string_value(json_object_get(row,
                                                               "notify"));
        ns.len = ns.data ? ngx_strlen(ns.data) : 0;
        rcpts[i].notify = sg_dlv_notify_bits(&ns);

        /* ORCPT: addr-type ";" xtext (RFC 3461, 4.2) */
        orcpt = json_string_value(json_object_get(row, "orcpt"));
        semi = orcpt ? ngx_strchr(orcpt, ';') : NULL;

        if (semi) {
            rcpts[i].orcpt_type = (char *) ngx_pnalloc(pool,
                                                       semi - orcpt + 1);
            id = ngx_pnalloc(pool, ngx_strlen(semi) + 1);

            if (rcpts[i].orcpt_type == NULL || id == NULL) {
                goto failed;
            }

            ngx_cpystrn((u_char *) rcpts[i].orcpt_type, (u_char *) orcpt,
                        semi - orcpt + 1);

            xin.data = semi + 1;
            xin.len = ngx_strlen(semi + 1);

            if (sg_smtp_xtext_decode(&xin, id, ngx_strlen(semi), &rlen)
                == SG_SMTP_OK)
            {
                id[rlen] = '\0';
                rcpts[i].orcpt = id;

            } else {
                rcpts[i].orcpt_type = NULL;
            }
        }

        p = (u_char *) (rcpts[i].action == SG_DSN_DELAYED
                        ? delay_ids + delay_len : final_ids + final_len);
        n = ngx_sprintf(p, "%s%L",
                        (rcpts[i].action == SG_DSN_DELAYED ? delay_len
                                                          : final_len) > 1
                        ? "," : "",
                        (int64_t) json_integer_value(json_object_get(row,
                                                                     "id")))
            - p;

        if (rcpts[i].action == SG_DSN_DELAYED) {
            delay_len += n;
            ndelay++;

        } else {
            final_len += n;
            nfinal++;
        }
    }

    final_ids[final_len++] = '}';
    delay_ids[delay_len++] = '}';

    /* a delay notice and a final report are separate DSNs */

    if (final_len > 2) {
        for (i = 0; i < nrows; i++) {
            if (rcpts[i].action == SG_DSN_DELAYED) {
                rcpts[i].notify = SG_DSN_NOTIFY_NEVER;
            }
        }

        delay_ids[0] = '{';
        delay_ids[1] = '}';
        delay_len = 2;
        ndelay = 0;
    }

    sender = PQgetvalue(res, 0, 0);

    ngx_memzero(&dsn, sizeof(sg_dsn_t));
    dsn.reporting_host = sg_dlv_cstr(pool, &sg_dlv.conf->hostname);
    dsn.sender = sender;
    dsn.envid = PQgetvalue(res, 0, 2);
    dsn.ret = ngx_strcmp(PQgetvalue(res, 0, 1), "HDRS") == 0
              ? SG_DSN_RET_HDRS
              : (ngx_strcmp(PQgetvalue(res, 0, 1), "FULL") == 0
                 ? SG_DSN_RET_FULL : SG_DSN_RET_UNSET);
    /* RFC 8689, 5; disabled, a flagged message is an ordinary one */
    dsn.requiretls = (PQgetvalue(res, 0, 3)[0] == 't')
                     && sg_worker.settings->requiretls_enabled;
    dsn.arrival = ngx_atotm((u_char *) PQgetvalue(res, 0, 4),
                            PQgetlength(res, 0, 4));
    dsn.now = ngx_time();
    dsn.message = body;
    dsn.message_len = body_len;
    dsn.message_total = ngx_atosz((u_char *) PQgetvalue(res, 0, 7),
                                  PQgetlength(res, 0, 7));
    dsn.max_return = SG_DLV_DSN_RETURN_MAX;
    dsn.rcpts = rcpts;
    dsn.nrcpts = nrows;

    if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
        goto failed;
    }

    id = ngx_pnalloc(pool, 17 + 60);
    if (id == NULL || dsn.reporting_host == NULL) {
        goto failed;
    }

    for (i = 0; i < 8; i++) {
        ngx_sprintf((u_char *) id + 2 * i, "%02Xd", rnd[i]);
    }

    id[16] = '\0';
    ngx_sprintf((u_char *) id + 17, "%s.dsn.%s%Z", id, orig);
    dsn.message_id = id + 17;
    dsn.boundary = id + 17;

    rc = sg_dsn_build(&dsn, NULL, 0, &result);

    if (rc == SG_DSN_NONE) {
        buf = NULL;
        result.len = 0;

    } else if (rc != SG_DSN_ERR_SPACE) {
        ngx_log_error(NGX_LOG_ERR, sg_dlv.log, 0,
                      "sg delivery: %s: cannot build the DSN: %s", orig,
                      result.err ? result.err : "invalid");
        goto failed;

    } else {
        buf = ngx_pnalloc(pool, result.len);
        if (buf == NULL
            || sg_dsn_build(&dsn, buf, result.len, &result) != SG_DSN_OK)
        {
            goto failed;
        }
    }

    /* the DSN goes to the original sender */

    at = strrchr(sender, '@');
    ns.data = (u_char *) (at ? at + 1 : "");
    ns.len = ngx_strlen(ns.data);

    dom.data = (u_char *) sg_dlv_cstr(pool, &ns);
    dom.len = ns.len;

    if (dom.data == NULL) {
        goto failed;
    }

    ngx_strlow(dom.data, dom.data, dom.len);

    l = sg_lists_current();
    host = (l && sg_lists_domain(l, dom.data, dom.len)) ? "t" : "f";

    sizes = ngx_pnalloc(pool, NGX_SIZE_T_LEN + 1);
    counts = ngx_pnalloc(pool, NGX_INT_T_LEN + 1);
    if (sizes == NULL || counts == NULL) {
        goto failed;
    }

    ngx_sprintf((u_char *) sizes, "%uz%Z", result.len);
    ngx_sprintf((u_char *) counts, "%ui%Z", buf ? nfinal + ndelay : 0);

    final_ids[final_len] = '\0';
    delay_ids[delay_len] = '\0';

    ngx_memzero(params, sizeof(params));

#define sg_dlv_param(i, s)                                                   \
    params[i].data = (s);                                                    \
    params[i].len = (s) ? ngx_strlen((s)) : 0

    sg_dlv_param(0, (char *) orig);
    sg_dlv_param(1, final_ids);
    sg_dlv_param(2, delay_ids);
    sg_dlv_param(3, id);
    sg_dlv_param(4, sizes);
    params[5].data = buf ? (char *) buf : "";
    params[5].len = result.len;
    params[5].binary = 1;
    sg_dlv_param(6, result.eightbit ? "8BITMIME" : "7BIT");
    sg_dlv_param(7, result.requiretls ? "t" : "f");
    sg_dlv_param(8, dsn.reporting_host);
    sg_dlv_param(9, counts);
    sg_dlv_param(10, sender);
    params[11].data = (char *) dom.data;
    params[11].len = dom.len;
    sg_dlv_param(12, host);

#undef sg_dlv_param

    json_decref(rows);
    rows = NULL;
    PQfreemem(body);
    body = NULL;

    /* PGresult values are freed after this handler: copy what we pass */
    for (i = 0; i < 13; i++) {
        if (params[i].data && !params[i].binary) {
            ns.len = params[i].len;
            ns.data = (u_char *) params[i].data;
            params[i].data = sg_dlv_cstr(pool, &ns);
            if (params[i].data == NULL) {
                goto failed;
            }
        }
    }

    if (sg_pg_query_params(sg_worker.pg, SG_DLV_DSN_QUEUE_SQL, 13, params,
                           sg_dlv_dsn_queued, NULL)
        != NGX_OK)
    {
        goto failed;
    }

    return;

failed:

    json_decref(rows);

    if (body) {
        PQfreemem(body);
    }

    sg_dlv_dsn_next();
}


static void
sg_dlv_dsn_queued(void *data, PGresult *res, const char *err,
    const char *sqlstate)
{
    if (err) {
        ngx_log_error(NGX_LOG_WARN, sg_dlv.log, 0,
                      "sg delivery: %s: cannot queue the DSN: %s",
                      sg_dlv_dsn_ids[sg_dlv_dsn_i - 1], err);

    } else if (PQntuples(res) > 0) {
        ngx_log_error(NGX_LOG_INFO, sg_dlv.log, 0,
                      "sg delivery: %s: DSN queued as %s",
                      sg_dlv_dsn_ids[sg_dlv_dsn_i - 1], PQgetvalue(res, 0, 0));
    }

    sg_dlv_dsn_next();
}


/* what came off the network goes into JSON and logs as printable ASCII */

static void
sg_dlv_printable(u_char *p)
{
    for ( /* void */ ; *p; p++) {
        if (*p < 0x20 || *p >= 0x7f) {
            *p = '?';
        }
    }
}


static double
sg_dlv_now(void)
{
    ngx_time_t  *tp;

    tp = ngx_timeofday();

    return (double) tp->sec + (double) tp->msec / 1000.0;
}


static char *
sg_dlv_cstr(ngx_pool_t *pool, ngx_str_t *s)
{
    char  *p;

    p = ngx_pnalloc(pool, s->len + 1);
    if (p == NULL) {
        return NULL;
    }

    ngx_memcpy(p, s->data, s->len);
    p[s->len] = '\0';

    return p;
}


static ngx_int_t
sg_dlv_pstr(ngx_pool_t *pool, ngx_str_t *dst, const char *src, size_t len)
{
    dst->data = ngx_pnalloc(pool, len + 1);
    if (dst->data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(dst->data, src, len);
    dst->data[len] = '\0';
    dst->len = len;

    return NGX_OK;
}


/* ENVID is stored decoded; on the wire it is xtext (RFC 3461, 4.4) */

static ngx_int_t
sg_dlv_envid(ngx_pool_t *pool, ngx_str_t *dst, const char *src, size_t len)
{
    size_t  n;

    n = sg_dsn_xtext_encode((const unsigned char *) src, len, NULL, 0);

    dst->data = ngx_pnalloc(pool, n + 1);
    if (dst->data == NULL) {
        return NGX_ERROR;
    }

    dst->len = sg_dsn_xtext_encode((const unsigned char *) src, len,
                                   (char *) dst->data, n + 1);

    return NGX_OK;
}

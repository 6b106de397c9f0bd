/*
 * sg: outbound HTTPS GET through libcurl's multi_socket interface on
 * nginx's event loop (MTA-STS policy fetches; later ACME and TLS-RPT).
 *
 * One curl multi handle per worker.  curl's sockets are wrapped in nginx
 * connections with level-triggered events; its timer is an nginx timer.
 * The caller names the addresses to connect to (from sg's own DNS, put
 * into CURLOPT_RESOLVE): curl never resolves a name itself.
 *
 * What every request gets: HTTPS only, TLS 1.2 or later, SNI, certificate
 * and host name verification against the system's CA store plus the file
 * of sg_trusted_ca, no redirects (a 3xx is a failure), no proxy, no
 * connection reuse, a body limit and a total timeout.
 *
 * Every request is answered exactly once through its handler, never from
 * inside sg_http_get(), unless it was cancelled first.
 */

#ifndef _SG_HTTP_H_INCLUDED_
#define _SG_HTTP_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>


#define SG_HTTP_TIMEOUT_MAX     60000       /* ms: RFC 8461, 3.3 */
#define SG_HTTP_BODY_MAX        65536       /* RFC 8461, 3.3: 64 KiB */
#define SG_HTTP_MAX_ADDRS       16
#define SG_HTTP_REASON_LEN      512


typedef struct sg_http_req_s  sg_http_req_t;


typedef enum {
    SG_HTTP_OK = 0,
    SG_HTTP_ERR_DNS,            /* no address to connect to */
    SG_HTTP_ERR_CONNECT,        /* every address refused or unreachable */
    SG_HTTP_ERR_TLS,            /* the TLS handshake failed */
    SG_HTTP_ERR_TLS_VERIFY,     /* certificate untrusted, expired, or not
                                   for the host name */
    SG_HTTP_ERR_TIMEOUT,
    SG_HTTP_ERR_TOO_BIG,        /* body above max_body */
    SG_HTTP_ERR_REDIRECT,       /* a 3xx answer (not followed) */
    SG_HTTP_ERR_STATUS,         /* another status than 200 */
    SG_HTTP_ERR_CONTENT_TYPE,   /* refused by the caller's type_ok */
    SG_HTTP_ERR_PROTOCOL,       /* not HTTP, reset, truncated ... */
    SG_HTTP_ERR_INTERNAL        /* out of memory, curl setup */
} sg_http_error_e;


/* what the server's certificate looked like (depth 0), if one was seen */
typedef struct {
    unsigned             seen:1;
    unsigned             verified:1;    /* chain and host name both ok */
    long                 verify_result; /* X509_V_OK (0) or the first
                                           X509_V_ERR_* of the chain */
    ngx_str_t            verify_text;   /* X509_verify_cert_error_string */
    ngx_str_t            subject;       /* RFC 2253 */
    ngx_str_t            issuer;
    ngx_str_t            not_after;     /* "2025-01-31T12:00:00Z" */
    ngx_str_t            san;           /* DNS names, comma-separated */
} sg_http_cert_t;


typedef struct {
    sg_http_error_e      error;
    const char          *reason;        /* for people; NULL when OK */
    long                 status;        /* HTTP status; 0: none */
    ngx_str_t            content_type;  /* as the server sent it */
    ngx_str_t            location;      /* of a 3xx answer */
    ngx_str_t            body;          /* at most max_body octets */
    ngx_str_t            primary_ip;    /* the address that answered */
    sg_http_cert_t       cert;
    ngx_msec_t           elapsed;
    ngx_pool_t          *pool;          /* all of the above; the handler
                                           owns it: ngx_destroy_pool() */
} sg_http_result_t;


typedef void (*sg_http_handler_pt)(void *data, sg_http_result_t *result);

/* 1 to accept a Content-Type value (len octets, not NUL-terminated) */
typedef int (*sg_http_type_pt)(const char *value, size_t len);


typedef struct {
    ngx_str_t            url;           /* https://host[:port]/path */
    ngx_addr_t          *addrs;         /* where host is: port ignored */
    ngx_uint_t           naddrs;
    ngx_msec_t           timeout;       /* total; 0 or above the maximum:
                                           SG_HTTP_TIMEOUT_MAX */
    size_t               max_body;      /* 0: SG_HTTP_BODY_MAX */
    sg_http_type_pt      type_ok;       /* NULL: any Content-Type */
} sg_http_get_t;


ngx_int_t sg_http_init_worker(ngx_cycle_t *cycle);
void sg_http_exit_worker(void);

/* NULL: out of memory, a bad URL, or HTTP is not set up in this worker */
sg_http_req_t *sg_http_get(const sg_http_get_t *get,
    sg_http_handler_pt handler, void *data);

/* the handler will not be called */
void sg_http_cancel(sg_http_req_t *req);

/* a short name for logs and the API: "tls-verify", "timeout" ... */
const char *sg_http_error_name(sg_http_error_e error);


#endif /* _SG_HTTP_H_INCLUDED_ */

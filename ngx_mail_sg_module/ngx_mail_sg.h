/*
 * sg: the SMTP receiving protocol.  Shared declarations of its files.
 */

#ifndef _NGX_MAIL_SG_H_INCLUDED_
#define _NGX_MAIL_SG_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_mail.h>

#include "sg_core.h"
#include "sg_lists.h"
#include "sg_tls.h"
#include "sg_smtp_cmd.h"
#include "sg_smtp_data.h"


#define NGX_MAIL_SG_OUT_SIZE      8192
#define NGX_MAIL_SG_MEM_BODY      65536     /* then a temporary file */


typedef struct {
    size_t                    max_line;
    off_t                     max_message_size;
    ngx_uint_t                max_recipients;
    size_t                    max_header_size;
    ngx_uint_t                max_headers;
    ngx_msec_t                command_timeout;
    ngx_msec_t                data_timeout;
    ngx_msec_t                greeting_delay;
    ngx_uint_t                normalize;
    ngx_path_t               *temp_path;

    ngx_str_t                 greeting;
    ngx_str_t                 ehlo_caps;     /* fixed part, after line 1 */
} ngx_mail_sg_srv_conf_t;


typedef struct {
    ngx_str_t                 address;       /* to deliver to */
    ngx_str_t                 original;      /* as given in RCPT TO */
    ngx_str_t                 domain;        /* lower case */
    ngx_str_t                 notify;
    ngx_str_t                 orcpt;
    unsigned                  local:1;
    unsigned                  requiretls:1;  /* +requiretls */
} ngx_mail_sg_rcpt_t;


typedef struct {
    ngx_str_t                 name;
    ngx_str_t                 value;
} ngx_mail_sg_header_t;


typedef struct {
    ngx_mail_session_t       *session;
    ngx_buf_t                *out;

    ngx_str_t                 helo;
    u_char                    helo_buf[256];
    ngx_str_t                 tls_protocol;
    ngx_str_t                 tls_cipher;

    /* the transaction, in tpool */
    ngx_pool_t               *tpool;
    ngx_str_t                 sender;
    ngx_str_t                 ret;
    ngx_str_t                 envid;
    ngx_array_t              *rcpts;         /* ngx_mail_sg_rcpt_t */
    ngx_uint_t                refused;

    /* DATA */
    sg_smtp_data_t           *data;
    u_char                   *scratch;
    size_t                    scratch_size;
    ngx_buf_t                *mem;
    ngx_temp_file_t          *tf;
    off_t                     body_size;
    ngx_array_t              *headers;       /* ngx_mail_sg_header_t */
    u_char                   *map;           /* the mmap()ed temp file */
    size_t                    map_size;
    u_char                    queue_id[17];
    ngx_str_t                 received;
    int64_t                   rule_id;
    sg_pg_param_t            *commit_params; /* the commit's, in tpool */
    ngx_queue_t               commit_queue;  /* waiting for a batch */

    unsigned                  greeted:1;
    unsigned                  skip:1;        /* inside an over-long line */
    unsigned                  starttls:1;    /* handshake after the reply */
    unsigned                  starttls_offered:1;
    unsigned                  in_mail:1;
    unsigned                  in_data:1;
    unsigned                  waiting:1;     /* for the queue commit */
    unsigned                  smtputf8:1;
    unsigned                  body_8bit:1;
    unsigned                  requiretls_param:1;
    unsigned                  requiretls:1;  /* flagged, any source */
    unsigned                  tls_required_no:1;
    unsigned                  too_big:1;
    unsigned                  write_error:1;
    unsigned                  logged:1;      /* the transaction's line */
} ngx_mail_sg_ctx_t;


extern ngx_module_t  ngx_mail_sg_module;


void ngx_mail_sg_read_handler(ngx_event_t *rev);
void ngx_mail_sg_reset(ngx_mail_sg_ctx_t *ctx);
void ngx_mail_sg_reply(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    const char *fmt, ...);
void ngx_mail_sg_error(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    const char *reply);
void ngx_mail_sg_count_error(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx);
void ngx_mail_sg_flush(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx);
ngx_int_t ngx_mail_sg_notify_valid(sg_str_t *v);

/* ngx_mail_sg_queue.c */
ngx_int_t ngx_mail_sg_data_start(ngx_mail_session_t *s,
    ngx_mail_sg_ctx_t *ctx);
ngx_int_t ngx_mail_sg_data_read(ngx_mail_session_t *s,
    ngx_mail_sg_ctx_t *ctx);
void ngx_mail_sg_log(ngx_mail_session_t *s, ngx_mail_sg_ctx_t *ctx,
    const char *result);


#endif /* _NGX_MAIL_SG_H_INCLUDED_ */

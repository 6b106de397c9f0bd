/*
 * sg: the active certificate, served without a reload.
 *
 * Every worker parses the certificate that settings.active_certificate_id
 * names once per change (not per handshake) and hands it to OpenSSL from
 * a certificate callback installed on each server context.  Until one is
 * loaded, or while TLS is disabled in the settings, the certificate from
 * nginx.conf is served.
 */

#ifndef _SG_TLS_H_INCLUDED_
#define _SG_TLS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>


ngx_int_t sg_tls_install(ngx_conf_t *cf, ngx_ssl_t *ssl);
ngx_int_t sg_tls_init_worker(ngx_cycle_t *cycle);
void sg_tls_exit_worker(void);

/* id of the certificate this worker serves, 0 for the nginx.conf one */
int64_t sg_tls_active_id(void);


#endif /* _SG_TLS_H_INCLUDED_ */

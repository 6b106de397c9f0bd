
/*
 * libFuzzer target for sg_smtp_cmd_parse() and its helpers:
 * make -C tests/unit fuzz-run.  Besides memory errors (ASan, UBSan) it
 * checks the parser's promises: results point into the line, the path is
 * local_part "@" domain, the limits of RFC 5321, 4.5.3 hold.
 */


#include <stdlib.h>
#include <string.h>

#include "sg_smtp_cmd.h"


static void
check_str(const sg_str_t *s, const char *line, size_t len)
{
    if (s->data == NULL) {
        if (s->len != 0) {
            abort();
        }

        return;
    }

    if (s->data < line || s->data + s->len > line + len) {
        abort();
    }
}


int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);


int
LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    char           out[SG_SMTP_MAX_LINE];
    size_t         i, n, max_len;
    sg_str_t       v;
    const char    *line, *detail;
    sg_smtp_rc_e   rc;
    sg_smtp_cmd_t  cmd;

    line = (const char *) data;

    /* the first byte picks the limit, as a caller with extensions would */
    max_len = (size > 0 && (data[0] & 1)) ? 2048 : 0;

    rc = sg_smtp_cmd_parse(line, size, max_len, &cmd, &detail);

    if (rc != SG_SMTP_OK) {
        if (detail == NULL) {
            abort();
        }

        return 0;
    }

    if (detail != NULL || size + 2 > (max_len ? max_len : SG_SMTP_MAX_LINE)
        || cmd.nparams > SG_SMTP_MAX_PARAMS)
    {
        abort();
    }

    check_str(&cmd.arg, line, size);
    check_str(&cmd.path, line, size);
    check_str(&cmd.local_part, line, size);
    check_str(&cmd.domain, line, size);
    check_str(&cmd.auth_mech, line, size);
    check_str(&cmd.auth_initial, line, size);

    if (cmd.verb == SG_SMTP_CMD_MAIL || cmd.verb == SG_SMTP_CMD_RCPT) {

        if (cmd.null_path) {
            if (cmd.path.len != 0 || cmd.verb != SG_SMTP_CMD_MAIL) {
                abort();
            }

        } else if (cmd.local_part.len == 0
                   || cmd.local_part.len > SG_SMTP_MAX_LOCAL_PART
                   || cmd.domain.len > SG_SMTP_MAX_DOMAIN
                   || cmd.path.len + 2 > SG_SMTP_MAX_PATH
                   || cmd.path.data != cmd.local_part.data)
        {
            abort();

        } else if (cmd.postmaster) {
            if (cmd.domain.len != 0
                || cmd.path.len != cmd.local_part.len)
            {
                abort();
            }

        } else if (cmd.path.len != cmd.local_part.len + 1 + cmd.domain.len
                   || cmd.path.data[cmd.local_part.len] != '@'
                   || cmd.domain.data
                      != cmd.path.data + cmd.local_part.len + 1)
        {
            abort();

        } else if (!cmd.address_literal
                   && !sg_smtp_domain_valid(cmd.domain.data, cmd.domain.len,
                                            1))
        {
            abort();
        }
    }

    for (i = 0; i < cmd.nparams; i++) {
        check_str(&cmd.params[i].name, line, size);
        check_str(&cmd.params[i].value, line, size);

        if (cmd.params[i].name.len == 0
            || (cmd.params[i].value.data != NULL
                && cmd.params[i].value.len == 0))
        {
            abort();
        }
    }

    /* RFC 3461, 4: decoding never grows the text */
    if (sg_smtp_param_find(&cmd, "ORCPT", &v) && v.data != NULL
        && sg_smtp_xtext_decode(&v, out, sizeof(out), &n) == SG_SMTP_OK
        && n > v.len)
    {
        abort();
    }

    (void) sg_smtp_domain_valid(line, size, size > 0 && (data[0] & 2));

    return 0;
}

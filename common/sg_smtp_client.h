/* stub: being written */
#ifndef _SG_SMTP_CLIENT_H_INCLUDED_
#define _SG_SMTP_CLIENT_H_INCLUDED_
#endif

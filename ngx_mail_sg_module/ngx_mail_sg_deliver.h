/* stub: being written */
#ifndef _NGX_MAIL_SG_DELIVER_H_INCLUDED_
#define _NGX_MAIL_SG_DELIVER_H_INCLUDED_
#endif

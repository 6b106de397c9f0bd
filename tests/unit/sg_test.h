
/*
 * sg: a tiny unit test harness.
 *
 * CHECK(cond, name) counts one check; SG_TEST_DONE() prints the summary
 * line "unit: N passed, M failed" and evaluates to the exit status.
 */


#ifndef _SG_TEST_H_INCLUDED_
#define _SG_TEST_H_INCLUDED_


#include <stdio.h>


static unsigned  sg_test_passed;
static unsigned  sg_test_failed;


#define CHECK(cond, name)                                                    \
    do {                                                                     \
        if (cond) {                                                          \
            sg_test_passed++;                                                \
                                                                             \
        } else {                                                             \
            sg_test_failed++;                                                \
            printf("FAIL %s:%d: %s: %s\n", __FILE__, __LINE__,              \
                   (const char *) (name), #cond);                            \
        }                                                                    \
    } while (0)


#define SG_TEST_DONE()                                                       \
    (fflush(stderr),                                                         \
     printf("unit: %u passed, %u failed\n", sg_test_passed, sg_test_failed), \
     fflush(stdout),                                                         \
     (sg_test_failed == 0 && sg_test_passed > 0) ? 0 : 1)


#endif /* _SG_TEST_H_INCLUDED_ */

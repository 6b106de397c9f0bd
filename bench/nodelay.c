/*
 * bench/nodelay.c: LD_PRELOAD shim for the benchmark's STARTTLS front of
 * the sink (an nginx mail proxy): every TCP socket it creates or accepts
 * gets TCP_NODELAY. nginx's mail proxy sets no TCP_NODELAY; without it a
 * small write that follows an unacknowledged one (a message split over
 * two reads, a reply to pipelined commands) waits for the peer's delayed
 * ACK, 40 ms per message on loopback: a stall of the test rig, not of the
 * MTA under test. Built by bench/bench.py into its temporary folder.
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <sys/socket.h>

static void
nodelay(int fd)
{
    int  one = 1;

    (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

int
socket(int domain, int type, int protocol)
{
    static int (*real)(int, int, int);
    int         fd;

    if (real == NULL) {
        real = (int (*)(int, int, int)) dlsym(RTLD_NEXT, "socket");
    }
    fd = real(domain, type, protocol);
    if (fd >= 0 && (domain == AF_INET || domain == AF_INET6)
        && (type & 0xf) == SOCK_STREAM)
    {
        nodelay(fd);
    }
    return fd;
}

int
accept4(int s, struct sockaddr *addr, socklen_t *len, int flags)
{
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    int         fd;

    if (real == NULL) {
        real = (int (*)(int, struct sockaddr *, socklen_t *, int))
                   dlsym(RTLD_NEXT, "accept4");
    }
    fd = real(s, addr, len, flags);
    if (fd >= 0) {
        nodelay(fd);    /* fails harmlessly on unix sockets */
    }
    return fd;
}

int
accept(int s, struct sockaddr *addr, socklen_t *len)
{
    return accept4(s, addr, len, 0);
}

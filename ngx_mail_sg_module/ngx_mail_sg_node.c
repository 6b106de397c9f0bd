/*
 * sg: node-wide delivery connection counts, in shared memory.
 *
 * The zone "sg_delivery" holds a slot per delivering process (its pid,
 * start time and connections) and a tree of the destinations that have
 * sessions, each with the sessions of every slot that holds some (a
 * "hold").  A worker takes a slot when it starts and frees it when it
 * exits.
 *
 * Room is shared fairly.  A worker refused room for a destination (or on
 * the node) reserves the next free one for SG_NODE_WANT_TTL, renewing the
 * reservation each time it asks again; meanwhile others get no room that
 * would take it, and sessions of other workers give way while the
 * waiting worker has no room (sg_node_yield): one that has no next job
 * closes instead of idling, and one that has a next job closes if its
 * worker holds two more than the waiting worker, or any while the waiting
 * worker holds none.  For the node's room one connection giving way
 * serves the reservation.  Without this, a worker whose sessions always
 * have a next job would keep the other workers' mail waiting as long as
 * mail comes.
 *
 * A worker killed or crashed leaves its slot behind.  Any worker that
 * finds a slot whose process is gone (kill(pid, 0) says ESRCH, or the pid
 * now belongs to a process started at another time) drops its holds and
 * frees it: every worker looks when it starts (nginx starts a new worker
 * for one that died), when its lease timer runs, and while it waits for
 * room.
 *
 * The zone is sized for sg_delivery_concurrency destinations; a reload
 * with the same size keeps it (old workers finishing their transactions
 * still count).  A worker that finds no free slot, or a zone without
 * memory for one more destination, counts for itself only, and says so.
 */

#include <ngx_config.h>
#include <ngx_core.h>

#include "ngx_mail_sg_node.h"


#define SG_NODE_DEST_SIZE       512      /* slab class of a destination */
#define SG_NODE_HOLD_SIZE       32       /* slab class of a hold */
#define SG_NODE_NONE            ((ngx_uint_t) -1)
#define SG_NODE_WANT_TTL        1000     /* ms a reservation lasts unless
                                            renewed */


typedef struct sg_node_hold_s  sg_node_hold_t;

struct sg_node_hold_s {
    sg_node_hold_t      *next;
    ngx_uint_t           slot;
    ngx_uint_t           sessions;
};


/* a reservation: the slot that was refused room, and when (0: none) */

typedef struct {
    ngx_uint_t           slot;
    ngx_msec_t           at;
    ngx_uint_t           served;             /* a connection gave way for
                                                it: no other needs to */
    ngx_msec_t           served_at;          /* ... unless that was
                                                SG_NODE_WANT_TTL ago */
} sg_node_want_t;


typedef struct {
    ngx_str_node_t       sn;                 /* key: the destination */
    ngx_uint_t           sessions;           /* of every slot */
    sg_node_hold_t      *holds;
    sg_node_want_t       want;
    u_char               name[1];
} sg_node_dest_t;


typedef struct {
    ngx_pid_t            pid;                /* 0: free */
    unsigned long long   started;            /* /proc/PID/stat field 22 */
    ngx_uint_t           connections;
} sg_node_slot_t;


typedef struct {
    ngx_rbtree_t         tree;
    ngx_rbtree_node_t    sentinel;
    sg_node_want_t       want;               /* room on the node */
    sg_node_slot_t       slots[SG_NODE_SLOTS];
} sg_node_sh_t;


static ngx_int_t sg_node_zone_init(ngx_shm_zone_t *zone, void *data);
static sg_node_dest_t *sg_node_lookup(ngx_str_t *name);
static sg_node_hold_t *sg_node_hold(sg_node_dest_t *dest, ngx_uint_t slot,
    sg_node_hold_t ***prev);
static void sg_node_put(sg_node_dest_t *dest, sg_node_hold_t *hold,
    sg_node_hold_t **prev, ngx_uint_t sessions);
static ngx_uint_t sg_node_wanted(sg_node_want_t *want);
static ngx_uint_t sg_node_live(sg_node_want_t *want);
static void sg_node_want(sg_node_want_t *want);
static void sg_node_unwant(sg_node_want_t *want);
static ngx_uint_t sg_node_served(sg_node_want_t *want);
static void sg_node_serve(sg_node_want_t *want);
static void sg_node_sweep_locked(void);
static void sg_node_drop_slot(ngx_uint_t slot);
static unsigned long long sg_node_started(ngx_pid_t pid);
static void sg_node_alone(const char *why);


static ngx_str_t  sg_node_zone_name = ngx_string("sg_delivery");


static struct {
    ngx_slab_pool_t     *shpool;
    sg_node_sh_t        *sh;                 /* NULL: counting alone */
    ngx_uint_t           slot;
    ngx_log_t           *log;
} sg_node;


/* at configuration: the zone, sized for "concurrency" destinations */

ngx_shm_zone_t *
sg_node_zone_add(ngx_cycle_t *cycle, ngx_uint_t concurrency)
{
    size_t           size;
    ngx_conf_t       cf;
    ngx_shm_zone_t  *zone;

    /*
     * Every destination with a session is one SG_NODE_DEST_SIZE object and
     * one hold per process; twice that for the slab's partly used pages.
     */

    size = 16 * ngx_pagesize + sizeof(sg_node_sh_t)
           + 2 * concurrency * (SG_NODE_DEST_SIZE + 2 * SG_NODE_HOLD_SIZE);

    /* a core module's init_conf has no ngx_conf_t: the zone needs only this */

    ngx_memzero(&cf, sizeof(ngx_conf_t));
    cf.cycle = cycle;
    cf.pool = cycle->pool;
    cf.log = cycle->log;

    zone = ngx_shared_memory_add(&cf, &sg_node_zone_name, size,
                                 &sg_node_zone_name);
    if (zone == NULL) {
        return NULL;
    }

    zone->init = sg_node_zone_init;

    return zone;
}


static ngx_int_t
sg_node_zone_init(ngx_shm_zone_t *zone, void *data)
{
    sg_node_sh_t     *sh;
    ngx_slab_pool_t  *shpool;

    shpool = (ngx_slab_pool_t *) zone->shm.addr;

    if (data) {
        /* a reload with the same size: the counts go on */
        zone->data = data;
        return NGX_OK;
    }

    if (zone->shm.exists) {
        zone->data = shpool->data;
        return NGX_OK;
    }

    sh = ngx_slab_alloc(shpool, sizeof(sg_node_sh_t));
    if (sh == NULL) {
        return NGX_ERROR;
    }

    ngx_memzero(sh, sizeof(sg_node_sh_t));
    ngx_rbtree_init(&sh->tree, &sh->sentinel, ngx_str_rbtree_insert_value);

    /* a full zone is logged here, once per case, not by the slab */
    shpool->log_nomem = 0;
    shpool->data = sh;
    zone->data = sh;

    return NGX_OK;
}


/* in a worker: take a slot (after dropping those of dead processes) */

void
sg_node_init_process(ngx_shm_zone_t *zone, ngx_log_t *log)
{
    ngx_uint_t  i, slot;

    ngx_memzero(&sg_node, sizeof(sg_node));
    sg_node.log = log;
    sg_node.slot = SG_NODE_NONE;

    if (zone == NULL || zone->data == NULL) {
        sg_node_alone("there is no shared memory zone");
        return;
    }

    sg_node.shpool = (ngx_slab_pool_t *) zone->shm.addr;
    sg_node.sh = zone->data;

    ngx_shmtx_lock(&sg_node.shpool->mutex);

    sg_node_sweep_locked();

    slot = SG_NODE_NONE;

    for (i = 0; i < SG_NODE_SLOTS; i++) {
        if (sg_node.sh->slots[i].pid == ngx_pid) {
            /* a process that had this pid before */
            sg_node_drop_slot(i);
        }

        if (sg_node.sh->slots[i].pid == 0 && slot == SG_NODE_NONE) {
            slot = i;
        }
    }

    if (slot != SG_NODE_NONE) {
        sg_node.sh->slots[slot].pid = ngx_pid;
        sg_node.sh->slots[slot].started = sg_node_started(ngx_pid);
        sg_node.sh->slots[slot].connections = 0;
        sg_node.slot = slot;
    }

    ngx_shmtx_unlock(&sg_node.shpool->mutex);

    if (slot == SG_NODE_NONE) {
        sg_node_alone("every slot of the zone is taken");
    }
}


void
sg_node_exit_process(void)
{
    if (sg_node.sh == NULL) {
        return;
    }

    ngx_shmtx_lock(&sg_node.shpool->mutex);
    sg_node_drop_slot(sg_node.slot);
    ngx_shmtx_unlock(&sg_node.shpool->mutex);

    sg_node.sh = NULL;
}


ngx_int_t
sg_node_acquire(ngx_str_t *name, ngx_uint_t dest_limit, ngx_uint_t limit,
    ngx_uint_t connections)
{
    size_t            size;
    uint32_t          hash;
    ngx_int_t         rc;
    ngx_uint_t        i, total, reserved;
    sg_node_dest_t   *dest;
    sg_node_hold_t   *hold, **prev;
    sg_node_slot_t   *slots;

    if (sg_node.sh == NULL) {
        return NGX_DONE;
    }

    slots = sg_node.sh->slots;

    ngx_shmtx_lock(&sg_node.shpool->mutex);

    slots[sg_node.slot].connections = connections;

    total = 0;

    for (i = 0; i < SG_NODE_SLOTS; i++) {
        if (slots[i].pid) {
            total += slots[i].connections;
        }
    }

    /* room reserved by another worker is not taken */

    reserved = sg_node_wanted(&sg_node.sh->want);

    dest = sg_node_lookup(name);

    /*
     * A worker waits for one kind of room at a time: a reservation of the
     * other kind it holds would keep room from the others meanwhile (two
     * workers could each hold what the other waits for).
     */

    if (total + reserved >= limit) {
        sg_node_want(&sg_node.sh->want);
        sg_node_unwant(dest ? &dest->want : NULL);
        rc = NGX_DECLINED;
        goto done;
    }

    if (dest) {
        reserved = sg_node_wanted(&dest->want);

        if (dest->sessions + reserved >= dest_limit) {
            sg_node_want(&dest->want);
            sg_node_unwant(&sg_node.sh->want);
            rc = NGX_BUSY;
            goto done;
        }
    }

    rc = NGX_OK;

    if (dest == NULL) {
        size = offsetof(sg_node_dest_t, name) + name->len;

        dest = ngx_slab_alloc_locked(sg_node.shpool, size);
        if (dest == NULL) {
            goto full;
        }

        hash = ngx_crc32_long(name->data, name->len);

        ngx_memcpy(dest->name, name->data, name->len);
        dest->sn.node.key = hash;
        dest->sn.str.len = name->len;
        dest->sn.str.data = dest->name;
        dest->sessions = 0;
        dest->holds = NULL;
        dest->want.at = 0;

        ngx_rbtree_insert(&sg_node.sh->tree, &dest->sn.node);
    }

    hold = sg_node_hold(dest, sg_node.slot, &prev);

    if (hold == NULL) {
        hold = ngx_slab_alloc_locked(sg_node.shpool, sizeof(sg_node_hold_t));
        if (hold == NULL) {
            /* a destination made just now goes again */
            sg_node_put(dest, NULL, NULL, 0);
            goto full;
        }

        hold->slot = sg_node.slot;
        hold->sessions = 0;
        hold->next = dest->holds;
        dest->holds = hold;
    }

    hold->sessions++;
    dest->sessions++;
    slots[sg_node.slot].connections = connections + 1;

    /* a reservation of this worker is used */

    sg_node_unwant(&dest->want);
    sg_node_unwant(&sg_node.sh->want);

done:

    ngx_shmtx_unlock(&sg_node.shpool->mutex);

    return rc;

full:

    ngx_shmtx_unlock(&sg_node.shpool->mutex);

    ngx_log_error(NGX_LOG_ALERT, sg_node.log, 0,
                  "sg delivery: the shared memory zone \"%V\" has no room"
                  " for destination \"%V\": its session is not counted for"
                  " the node", &sg_node_zone_name, name);

    return NGX_DONE;
}


/*
 * A session of this worker has finished a job: should it close to make
 * room for another worker?  next: it has a next job here.
 */

ngx_uint_t
sg_node_yield(ngx_str_t *name, ngx_uint_t dest_limit, ngx_uint_t limit,
    ngx_uint_t next)
{
    ngx_uint_t       i, yield, total, mine, theirs;
    sg_node_dest_t  *dest;
    sg_node_slot_t  *slots;
    sg_node_hold_t  *hold, **prev;

    if (sg_node.sh == NULL) {
        return 0;
    }

    slots = sg_node.sh->slots;
    yield = 0;

    ngx_shmtx_lock(&sg_node.shpool->mutex);

    /*
     * Only while the waiting worker has no room: once a session has given
     * way, the others go on.  A session without a next job gives way; one
     * with a next job if its worker holds two more than the waiting one,
     * or any while the waiting one holds none (so the counts settle
     * within one of each other, and a limit smaller than the workers
     * waiting goes round).
     */

    dest = sg_node_lookup(name);

    if (dest && dest->sessions >= dest_limit && sg_node_wanted(&dest->want))
    {
        hold = sg_node_hold(dest, sg_node.slot, &prev);
        mine = hold ? hold->sessions : 0;

        hold = sg_node_hold(dest, dest->want.slot, &prev);
        theirs = hold ? hold->sessions : 0;

        yield = !next || mine > theirs + (theirs ? 1 : 0);
    }

    /* connections saying QUIT count: one that gave way serves the wait */

    if (!yield && sg_node_wanted(&sg_node.sh->want)
        && !sg_node_served(&sg_node.sh->want))
    {
        total = 0;

        for (i = 0; i < SG_NODE_SLOTS; i++) {
            if (slots[i].pid) {
                total += slots[i].connections;
            }
        }

        mine = slots[sg_node.slot].connections;
        theirs = slots[sg_node.sh->want.slot].connections;

        yield = total >= limit
                && (!next || mine > theirs + (theirs ? 1 : 0));

        if (yield) {
            sg_node_serve(&sg_node.sh->want);
        }
    }

    ngx_shmtx_unlock(&sg_node.shpool->mutex);

    return yield;
}


void
sg_node_release(ngx_str_t *name, ngx_uint_t connections)
{
    sg_node_dest_t   *dest;
    sg_node_hold_t   *hold, **prev;

    if (sg_node.sh == NULL) {
        return;
    }

    ngx_shmtx_lock(&sg_node.shpool->mutex);

    sg_node.sh->slots[sg_node.slot].connections = connections;

    /* not found: it was not counted (the zone was full) */

    dest = sg_node_lookup(name);

    if (dest) {
        hold = sg_node_hold(dest, sg_node.slot, &prev);

        if (hold) {
            sg_node_put(dest, hold, prev, 1);
        }
    }

    ngx_shmtx_unlock(&sg_node.shpool->mutex);
}


/*
 * This worker waits for room on the node and has an idle connection: it
 * closes it for its own mail (1) unless a connection already gave way.
 */

ngx_uint_t
sg_node_serve_own(void)
{
    ngx_uint_t       serve;
    sg_node_want_t  *want;

    if (sg_node.sh == NULL) {
        return 0;
    }

    ngx_shmtx_lock(&sg_node.shpool->mutex);

    want = &sg_node.sh->want;

    serve = want->slot == sg_node.slot && sg_node_live(want)
            && !sg_node_served(want);

    if (serve) {
        sg_node_serve(want);
    }

    ngx_shmtx_unlock(&sg_node.shpool->mutex);

    return serve;
}


void
sg_node_connections(ngx_uint_t connections)
{
    if (sg_node.sh == NULL) {
        return;
    }

    ngx_shmtx_lock(&sg_node.shpool->mutex);
    sg_node.sh->slots[sg_node.slot].connections = connections;
    ngx_shmtx_unlock(&sg_node.shpool->mutex);
}


void
sg_node_sweep(void)
{
    if (sg_node.sh == NULL) {
        return;
    }

    ngx_shmtx_lock(&sg_node.shpool->mutex);
    sg_node_sweep_locked();
    ngx_shmtx_unlock(&sg_node.shpool->mutex);
}


static sg_node_dest_t *
sg_node_lookup(ngx_str_t *name)
{
    ngx_str_node_t  *sn;

    sn = ngx_str_rbtree_lookup(&sg_node.sh->tree, name,
                               ngx_crc32_long(name->data, name->len));

    return sn ? (sg_node_dest_t *) sn : NULL;
}


static sg_node_hold_t *
sg_node_hold(sg_node_dest_t *dest, ngx_uint_t slot, sg_node_hold_t ***prev)
{
    sg_node_hold_t  *hold, **p;

    for (p = &dest->holds; *p; p = &(*p)->next) {
        hold = *p;

        if (hold->slot == slot) {
            *prev = p;
            return hold;
        }
    }

    return NULL;
}


/*
 * Take "sessions" off a hold (NULL: none); a hold without sessions and a
 * destination without holds are freed.
 */

static void
sg_node_put(sg_node_dest_t *dest, sg_node_hold_t *hold, sg_node_hold_t **prev,
    ngx_uint_t sessions)
{
    if (hold) {
        sessions = ngx_min(sessions, hold->sessions);
        hold->sessions -= sessions;
        dest->sessions -= ngx_min(sessions, dest->sessions);

        if (hold->sessions == 0) {
            *prev = hold->next;
            ngx_slab_free_locked(sg_node.shpool, hold);
        }
    }

    /* a live reservation keeps it (the waiting worker's turn is in it) */

    if (dest->holds == NULL && !sg_node_live(&dest->want)) {
        ngx_rbtree_delete(&sg_node.sh->tree, &dest->sn.node);
        ngx_slab_free_locked(sg_node.shpool, dest);
    }
}


/* a live reservation of another worker */

static ngx_uint_t
sg_node_wanted(sg_node_want_t *want)
{
    return want->slot != sg_node.slot && sg_node_live(want);
}


/* a live reservation, whoever made it; one that ran out is cleared */

static ngx_uint_t
sg_node_live(sg_node_want_t *want)
{
    if (want->at == 0) {
        return 0;
    }

    /* ngx_current_msec is each process's reading of one monotonic clock */

    if ((ngx_msec_int_t) (ngx_current_msec - want->at) >= SG_NODE_WANT_TTL) {
        want->at = 0;
        return 0;
    }

    return 1;
}


/* a connection gave way for the reservation, lately */

static ngx_uint_t
sg_node_served(sg_node_want_t *want)
{
    return want->served
           && (ngx_msec_int_t) (ngx_current_msec - want->served_at)
              < SG_NODE_WANT_TTL;
}


static void
sg_node_serve(sg_node_want_t *want)
{
    want->served = 1;
    want->served_at = ngx_current_msec;
}


/* this worker's reservation, if it is one, goes */

static void
sg_node_unwant(sg_node_want_t *want)
{
    if (want && want->at && want->slot == sg_node.slot) {
        want->at = 0;
    }
}


/* this worker was refused room: it reserves the next, unless another has */

static void
sg_node_want(sg_node_want_t *want)
{
    if (sg_node_wanted(want)) {
        return;
    }

    /* this worker's own is renewed; a new one is not served yet */

    if (!sg_node_live(want)) {
        want->served = 0;
    }

    want->slot = sg_node.slot;
    want->at = ngx_current_msec ? ngx_current_msec : 1;
}


static void
sg_node_sweep_locked(void)
{
    ngx_uint_t           i;
    ngx_pid_t            pid;
    sg_node_slot_t      *slot;
    unsigned long long   started;

    for (i = 0; i < SG_NODE_SLOTS; i++) {
        slot = &sg_node.sh->slots[i];
        pid = slot->pid;

        if (pid == 0 || pid == ngx_pid) {
            continue;
        }

        /*
         * EPERM: alive, under another user; zombies are reaped at once.
         * A pid in use again belongs to a process started at another time.
         */

        if (kill(pid, 0) == 0 || ngx_errno != NGX_ESRCH) {
            started = slot->started ? sg_node_started(pid) : 0;

            /* 0: /proc does not say (hidepid): taken as the same process */

            if (started == 0 || started == slot->started) {
                continue;
            }
        }

        ngx_log_error(NGX_LOG_NOTICE, sg_node.log, 0,
                      "sg delivery: process %P is gone: its %ui"
                      " connections no longer count on this node",
                      pid, slot->connections);

        sg_node_drop_slot(i);
    }

    /* destinations whose reservation ran out, with no sessions */
    sg_node_drop_slot(SG_NODE_NONE);
}


/*
 * The slot's holds and reservations go (slot SG_NODE_NONE: none), and so
 * do destinations left with neither holds nor a live reservation.
 */

static void
sg_node_drop_slot(ngx_uint_t slot)
{
    ngx_rbtree_t       *tree;
    sg_node_dest_t     *dest;
    sg_node_hold_t     *hold, **prev;
    ngx_rbtree_node_t  *node, *next;

    tree = &sg_node.sh->tree;

    if (tree->root != tree->sentinel) {
        node = ngx_rbtree_min(tree->root, tree->sentinel);

        while (node) {
            next = ngx_rbtree_next(tree, node);

            dest = (sg_node_dest_t *) node;

            if (dest->want.at && dest->want.slot == slot) {
                dest->want.at = 0;
            }

            prev = NULL;
            hold = sg_node_hold(dest, slot, &prev);
            sg_node_put(dest, hold, prev, hold ? hold->sessions : 0);

            node = next;
        }
    }

    if (sg_node.sh->want.at && sg_node.sh->want.slot == slot) {
        sg_node.sh->want.at = 0;
    }

    if (slot != SG_NODE_NONE) {
        sg_node.sh->slots[slot].pid = 0;
        sg_node.sh->slots[slot].connections = 0;
    }
}


/* when the process started (clock ticks after boot); 0: unknown */

static unsigned long long
sg_node_started(ngx_pid_t pid)
{
    int                 fd;
    char               *p;
    ssize_t             n;
    ngx_uint_t          field;
    unsigned long long  started;
    char                path[64], buf[1024];

    ngx_snprintf((u_char *) path, sizeof(path) - 1, "/proc/%P/stat%Z", pid);

    fd = open(path, O_RDONLY);
    if (fd == -1) {
        return 0;
    }

    n = read(fd, buf, sizeof(buf) - 1);
    (void) close(fd);

    if (n <= 0) {
        return 0;
    }

    buf[n] = '\0';

    /* field 2, the command name, may hold anything: count after its ')' */

    p = strrchr(buf, ')');
    if (p == NULL) {
        return 0;
    }

    for (field = 2; field < 22 && p; field++) {
        p = strchr(p + 1, ' ');
    }

    if (p == NULL) {
        return 0;
    }

    started = strtoull(p + 1, NULL, 10);

    return started;
}


static void
sg_node_alone(const char *why)
{
    ngx_log_error(NGX_LOG_WARN, sg_node.log, 0,
                  "sg delivery: %s: this worker's outbound connections"
                  " count against sg_delivery_concurrency and"
                  " sg_delivery_destination_concurrency for itself only",
                  why);

    sg_node.sh = NULL;
}

/* A load generator that is not the bottleneck: epoll, no allocation per request.
 *
 *   loadgen server PORT                       answer each SIZE-byte request with SIZE bytes
 *   loadgen rate HOST PORT CONC SECONDS SIZE [THREADS [FILE]]
 *                                             new connection per request, CONC at once,
 *                                             over THREADS epoll threads (default 1); with
 *                                             FILE, the request is its bytes (a recorded
 *                                             ClientHello, say) and SIZE is ignored
 *   loadgen pingpong HOST PORT COUNT SIZE     COUNT round trips on one connection
 *   loadgen udpserver PORT                    echo every datagram
 *   loadgen udp HOST PORT COUNT SIZE WINDOW   COUNT datagrams, WINDOW in flight, each echoed
 *
 * rate and pingpong print one JSON object: per second figures and latency percentiles (us).
 * Built by the benchmark harness with gcc -O2 -pthread.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXEV 256
#define MAXSIZE 65536

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, long n, double p) {
    if (n == 0) return 0;
    long i = (long)(p * (n - 1));
    return v[i];
}

static int addr(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len) {
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons(port);
        *len = sizeof *a4;
        return AF_INET;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons(port);
        *len = sizeof *a6;
        return AF_INET6;
    }
    fprintf(stderr, "bad address %s\n", host);
    exit(2);
}

static void raise_nofile(void) {
    struct rlimit r;
    getrlimit(RLIMIT_NOFILE, &r);
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
}

/* --- server: read SIZE bytes (any amount), answer with as many, until EOF ----------------- */
static int server(int port) {
    static char buf[MAXSIZE];
    int ls = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1, zero = 0;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(ls, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = in6addr_any};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) { perror("listen"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, evs[MAXEV];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    printf("listening on %d\n", port);
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, evs, MAXEV, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                if (write(fd, buf, r) < 0) close(fd); /* small answers: the buffer takes them */
            } else if (r == 0 || errno != EAGAIN) {
                close(fd);
            }
        }
    }
}

/* --- rate: CONC connections in flight, each connect + request + answer + close ------------
 * THREADS threads, each with its own epoll and its share of CONC: one thread tops out near
 * 16k connections/s here, under what the kernel forwards. The results are summed. */
struct slot { int fd; int got; double start; };
static char rate_req[MAXSIZE]; /* filled before the threads start; read only after */

struct rate_job {
    struct sockaddr_storage ss; socklen_t len; int fam;
    int conc, size; double t0, end;
    long done, failed, cap; double *lat; /* out */
};

static void *rate_thread(void *arg) {
    struct rate_job *j = arg;
    int ep = epoll_create1(0), one = 1, conc = j->conc, size = j->size;
    static __thread char buf[MAXSIZE];
    const char *req = rate_req;
    struct slot *slots = calloc(conc, sizeof *slots);
    struct epoll_event evs[MAXEV];
    double end = j->end;
    for (int i = 0; i < conc; i++) slots[i].fd = -1;
    for (;;) {
        double t = now();
        for (int i = 0; i < conc; i++) {
            if (slots[i].fd >= 0 || t >= end) continue;
            int fd = socket(j->fam, SOCK_STREAM | SOCK_NONBLOCK, 0);
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            slots[i] = (struct slot){fd, -1, t};
            if (connect(fd, (struct sockaddr *)&j->ss, j->len) && errno != EINPROGRESS) {
                close(fd); slots[i].fd = -1; j->failed++; continue;
            }
            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = i};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        }
        int active = 0;
        for (int i = 0; i < conc; i++) active += slots[i].fd >= 0;
        if (!active && t >= end) break;
        if (t >= end + 5) { j->failed += active; break; } /* stragglers count as failures */
        int n = epoll_wait(ep, evs, MAXEV, 100);
        for (int k = 0; k < n; k++) {
            struct slot *s = &slots[evs[k].data.u32];
            if (s->fd < 0) continue;
            if (s->got < 0) { /* connected (or failed): send the request */
                int err = 0; socklen_t el = sizeof err;
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err || write(s->fd, req, size) != size) goto fail;
                s->got = 0;
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = evs[k].data.u32};
                epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
                continue;
            }
            ssize_t r = read(s->fd, buf, sizeof buf);
            if (r <= 0) { if (r < 0 && errno == EAGAIN) continue; goto fail; }
            s->got += r;
            if (s->got < size) continue;
            if (j->done < j->cap) j->lat[j->done] = now() - s->start;
            j->done++;
            close(s->fd); s->fd = -1;
            continue;
        fail:
            j->failed++;
            close(s->fd); s->fd = -1;
        }
    }
    for (int i = 0; i < conc; i++) if (slots[i].fd >= 0) close(slots[i].fd);
    free(slots);
    close(ep);
    return NULL;
}

static int rate(const char *host, int port, int conc, double seconds, int size, int threads,
                const char *file) {
    if (threads < 1) threads = 1;
    if (threads > conc) threads = conc;
    struct rate_job *jobs = calloc(threads, sizeof *jobs);
    pthread_t *tids = calloc(threads, sizeof *tids);
    long cap = (1 << 22) / threads;
    memset(rate_req, 'r', sizeof rate_req);
    if (file) {
        FILE *f = fopen(file, "rb");
        if (!f) { perror(file); return 2; }
        size = (int)fread(rate_req, 1, sizeof rate_req, f);
        fclose(f);
    }
    double t0 = now();
    for (int t = 0; t < threads; t++) {
        struct rate_job *j = &jobs[t];
        j->fam = addr(host, port, &j->ss, &j->len);
        j->conc = conc / threads + (t < conc % threads); /* CONC shared out */
        j->size = size; j->t0 = t0; j->end = t0 + seconds;
        j->cap = cap; j->lat = malloc(cap * sizeof *j->lat);
        if (pthread_create(&tids[t], NULL, rate_thread, j)) { perror("pthread_create"); return 1; }
    }
    long done = 0, failed = 0, m = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(tids[t], NULL);
        done += jobs[t].done;
        failed += jobs[t].failed;
    }
    double took = now() - t0;
    double *lat = malloc((size_t)cap * threads * sizeof *lat);
    for (int t = 0; t < threads; t++) {
        long k = jobs[t].done < cap ? jobs[t].done : cap;
        memcpy(lat + m, jobs[t].lat, k * sizeof *lat);
        m += k;
    }
    qsort(lat, m, sizeof *lat, cmp);
    printf("{\"conn_per_s\": %.1f, \"done\": %ld, \"failed\": %ld, \"p50_us\": %.1f, "
           "\"p99_us\": %.1f, \"seconds\": %.3f, \"threads\": %d}\n", done / took, done, failed,
           pct(lat, m, 0.50) * 1e6, pct(lat, m, 0.99) * 1e6, took, threads);
    return failed > done / 100; /* more than 1% failures: not a valid measurement */
}

/* --- pingpong: one connection, COUNT round trips of SIZE bytes ---------------------------- */
static int pingpong(const char *host, int port, long count, int size) {
    struct sockaddr_storage ss; socklen_t len;
    int fam = addr(host, port, &ss, &len), one = 1;
    static char req[MAXSIZE], buf[MAXSIZE];
    memset(req, 'p', sizeof req);
    int fd = socket(fam, SOCK_STREAM, 0);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&ss, len)) { perror("connect"); return 1; }
    double *lat = malloc(count * sizeof *lat), t0 = now();
    for (long i = 0; i < count; i++) {
        double t = now();
        if (write(fd, req, size) != size) { perror("write"); return 1; }
        int got = 0;
        while (got < size) {
            ssize_t r = read(fd, buf, sizeof buf);
            if (r <= 0) { perror("read"); return 1; }
            got += r;
        }
        lat[i] = now() - t;
    }
    double took = now() - t0;
    qsort(lat, count, sizeof *lat, cmp);
    printf("{\"round_trips_per_s\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, \"count\": %ld}\n",
           count / took, pct(lat, count, 0.50) * 1e6, pct(lat, count, 0.99) * 1e6, count);
    return 0;
}

/* --- UDP: an echo server, and a client keeping WINDOW datagrams in flight ------------------- */
static int udpserver(int port) {
    static char buf[MAXSIZE];
    int s = socket(AF_INET6, SOCK_DGRAM, 0), zero = 0, big = 4 << 20;
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = in6addr_any};
    if (bind(s, (struct sockaddr *)&a, sizeof a)) { perror("bind"); return 1; }
    printf("listening on %d\n", port);
    fflush(stdout);
    for (;;) {
        struct sockaddr_storage peer; socklen_t pl = sizeof peer;
        ssize_t r = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&peer, &pl);
        if (r >= 0) sendto(s, buf, r, 0, (struct sockaddr *)&peer, pl);
    }
}

static int udp(const char *host, int port, long count, int size, int window) {
    struct sockaddr_storage ss; socklen_t len;
    int fam = addr(host, port, &ss, &len);
    int s = socket(fam, SOCK_DGRAM, 0);
    if (connect(s, (struct sockaddr *)&ss, len)) { perror("connect"); return 1; }
    struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    static char buf[MAXSIZE], msg[MAXSIZE];
    double *sent = calloc(count, sizeof *sent), *lat = malloc(count * sizeof *lat), t0 = now();
    long next = 0, got = 0, lost = 0;
    while (next < window && next < count) {
        memcpy(msg, &next, sizeof next); sent[next] = now(); send(s, msg, size, 0); next++;
    }
    while (got + lost < count) {
        ssize_t r = recv(s, buf, sizeof buf, 0);
        if (r < (ssize_t)sizeof(long)) { /* a timeout: count the window as lost, go on */
            lost += next - got - lost;
            if (next >= count) break;
        } else {
            long id; memcpy(&id, buf, sizeof id);
            if (id >= 0 && id < count && sent[id] > 0) { lat[got++] = now() - sent[id]; sent[id] = -1; }
        }
        while (next < count && next - got - lost < window) {
            memcpy(msg, &next, sizeof next); sent[next] = now(); send(s, msg, size, 0); next++;
        }
    }
    double took = now() - t0;
    qsort(lat, got, sizeof *lat, cmp);
    printf("{\"datagrams_per_s\": %.1f, \"received\": %ld, \"lost\": %ld, \"p50_us\": %.1f, "
           "\"p99_us\": %.1f}\n", got / took, got, lost, pct(lat, got, 0.50) * 1e6,
           pct(lat, got, 0.99) * 1e6);
    return lost > count / 100;
}

int main(int argc, char **argv) {
    raise_nofile();
    if (argc == 3 && !strcmp(argv[1], "server")) return server(atoi(argv[2]));
    if (argc >= 7 && argc <= 9 && !strcmp(argv[1], "rate"))
        return rate(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]), atoi(argv[6]),
                    argc >= 8 ? atoi(argv[7]) : 1, argc == 9 ? argv[8] : NULL);
    if (argc == 3 && !strcmp(argv[1], "udpserver")) return udpserver(atoi(argv[2]));
    if (argc == 7 && !strcmp(argv[1], "udp"))
        return udp(argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]), atoi(argv[6]));
    if (argc == 6 && !strcmp(argv[1], "pingpong"))
        return pingpong(argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: loadgen server PORT | rate HOST PORT CONC SECONDS SIZE [THREADS [FILE]] | "
                    "pingpong HOST PORT COUNT SIZE\n");
    return 2;
}

/*
 * fenced-proof's clock shim: loaded into a server with LD_PRELOAD, it moves the server's wall
 * clock (gettimeofday, time, clock_gettime on the realtime clocks) by a number of seconds read
 * from the file named in FENCED_PROOF_CLOCK_FILE ("+3600", "-10", "0"). The monotonic clocks
 * are left alone, as an NTP step would leave them.
 *
 * libfaketime does this for the workers, but inside redis-server it deadlocks against jemalloc
 * (it resolves the real functions with dlsym, which allocates, and jemalloc's start-up reads the
 * clock). This shim never allocates and never calls dlsym: it reads the clocks with the raw
 * system call, and re-reads the file at most every 10 ms of monotonic time.
 *
 * Built at run time by fenced-proof with the machine's C compiler:
 *   cc -shared -fPIC -O2 -o libfenced_clock.so clock_shim.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long long offset_ns;
static long long next_read_ns;

static int raw_clock(clockid_t clock, struct timespec *ts) {
    return (int)syscall(SYS_clock_gettime, clock, ts);
}

/* The current offset, from the file when the last read is more than 10 ms old. */
static long long offset(void) {
    struct timespec mono;
    if (raw_clock(CLOCK_MONOTONIC, &mono) != 0) {
        return __atomic_load_n(&offset_ns, __ATOMIC_RELAXED);
    }
    long long now = (long long)mono.tv_sec * 1000000000LL + mono.tv_nsec;
    if (now >= __atomic_load_n(&next_read_ns, __ATOMIC_RELAXED)) {
        __atomic_store_n(&next_read_ns, now + 10000000LL, __ATOMIC_RELAXED);
        const char *path = getenv("FENCED_PROOF_CLOCK_FILE");
        if (path != NULL) {
            int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
            if (fd >= 0) {
                char buf[32];
                long n = (long)syscall(SYS_read, fd, buf, sizeof buf - 1);
                syscall(SYS_close, fd);
                if (n > 0) {
                    buf[n] = '\0';
                    long long seconds = strtoll(buf, NULL, 10);
                    __atomic_store_n(&offset_ns, seconds * 1000000000LL, __ATOMIC_RELAXED);
                }
            }
        }
    }
    return __atomic_load_n(&offset_ns, __ATOMIC_RELAXED);
}

static int is_realtime(clockid_t clock) {
    return clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE;
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    int r = raw_clock(clock, ts);
    if (r == 0 && is_realtime(clock)) {
        long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + offset();
        ts->tv_sec = (time_t)(ns / 1000000000LL);
        ts->tv_nsec = (long)(ns % 1000000000LL);
    }
    return r;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    (void)tz;
    struct timespec ts;
    int r = clock_gettime(CLOCK_REALTIME, &ts);
    if (r == 0) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return r;
}

time_t time(time_t *out) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) {
        return (time_t)-1;
    }
    if (out != NULL) {
        *out = ts.tv_sec;
    }
    return ts.tv_sec;
}

/*
 * memdirtier: the test guest's memory load for katamaran's benchmark (the dirty-ram point).
 *
 * Why steady, not a burst a second: the guest used to copy its whole region once a
 * second (`dd; sleep 1`), starting as it booted.  Every migration then began at the
 * same place in that cycle, so a flow whose RAM phase began a little later always met
 * a whole rewrite (one more pass) and the other never did: on 2026-12-04 katamaran
 * sent 116.8 MB of RAM in every round and the bare QMP sequence 97.7 MB, at the same
 * rate.  Written page by page on a 10 ms clock, each RAM phase meets the same rate
 * wherever it begins.
 *
 * What: REGION MiB (default: the rate) of anonymous memory filled with pseudo-random
 * bytes (QEMU sends a zero page as a flag, which would cost nothing to migrate), then
 * MIB_PER_S MiB of those pages rewritten every second, one byte per page, in order
 * round the region: each write makes the whole page dirty for the migration.  Late
 * ticks (a busy TCG vCPU) are caught up, so the rate holds on average if the vCPU can
 * keep it at all.
 *
 * Usage: memdirtier MIB_PER_S [REGION_MIB]
 * Built statically (gcc -static -O2) because the guest has no libc.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096
#define TICK_NS (10 * 1000000LL)
#define PAGES_PER_MIB 256

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: memdirtier MIB_PER_S [REGION_MIB]\n");
        return 2;
    }
    long rate = strtol(argv[1], NULL, 10);
    long region = argc == 3 ? strtol(argv[2], NULL, 10) : rate;
    if (rate <= 0 || region <= 0) {
        fprintf(stderr, "memdirtier: MIB_PER_S and REGION_MIB must be positive\n");
        return 2;
    }
    size_t pages = (size_t)region * PAGES_PER_MIB;
    uint8_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        perror("memdirtier: mmap");
        return 1;
    }
    /* xorshift64, no /dev/urandom; `| 1` makes every 8th byte odd, and adding 2 keeps
     * an odd byte odd: no page ever becomes a zero page */
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < pages * PAGE; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *(uint64_t *)(mem + i) = x | 1;
    }
    long long pages_per_s = (long long)rate * PAGES_PER_MIB;
    printf("memdirtier: %ld MiB region, %ld MiB/s\n", region, rate);
    fflush(stdout);
    long long start = now_ns();
    long long written = 0; /* pages rewritten since start */
    for (long long tick = 1;; tick++) {
        long long due = tick * pages_per_s / (1000000000LL / TICK_NS); /* no overflow */
        for (; written < due; written++) {
            size_t page = (size_t)(written % (long long)pages);
            mem[page * PAGE + (size_t)(written / (long long)pages % PAGE)] += 2;
        }
        long long at = start + tick * TICK_NS;
        struct timespec ts = {at / 1000000000LL, at % 1000000000LL};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
    }
}

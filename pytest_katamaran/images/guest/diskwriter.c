/*
 * diskwriter: the test guest's storage workload for katamaran's migration tests.
 *
 * Why: a live migration must not lose a single write the guest was told is durable.
 * This writes stamped 4 KiB blocks sequentially with O_DIRECT|O_DSYNC (a returned
 * pwrite is durable) and prints "ACK <seq>" to stdout (the serial console) meaning
 * "seq and every earlier write is durable". pytest_katamaran/diskcheck.py later checks
 * the disk image holds every acknowledged seq.
 *
 * Block layout: defined once in pytest_katamaran/diskcheck.py; this file must match it.
 *   0 magic "KMRWRITE" | 8 seq u64 | 16 block u64 | 24 nblocks u64 |
 *   32 crc32 u32 of [0,32)+[36,4096) | 36.. pattern byte (seq + j) % 256
 *
 * Usage: diskwriter DEVICE [WRITES_PER_SEC [MAX_WRITES]]
 *   WRITES_PER_SEC 0 = as fast as possible (default); MAX_WRITES 0 = forever (default).
 * Built statically (gcc -static -O2) because the guest has no libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define CRC_OFF 32
#define PATTERN_OFF 36
#define ACK_EVERY 32
#define ACK_NS (20 * 1000000LL)

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* Same chaining semantics as Python's zlib.crc32(data, crc). */
static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void stamp(uint8_t *buf, uint64_t seq, uint64_t nblocks)
{
    memcpy(buf, "KMRWRITE", 8);
    put_u64(buf + 8, seq);
    put_u64(buf + 16, seq % nblocks);
    put_u64(buf + 24, nblocks);
    for (int j = 0; j < BLOCK - PATTERN_OFF; j++)
        buf[PATTERN_OFF + j] = (uint8_t)(seq + (uint64_t)j);
    uint32_t crc = crc32_update(0, buf, CRC_OFF);
    crc = crc32_update(crc, buf + PATTERN_OFF, BLOCK - PATTERN_OFF);
    put_u32(buf + CRC_OFF, crc);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* One write(2) per line so a line reaches the console whole. */
static void say(const char *fmt, unsigned long long v)
{
    char line[96];
    int n = snprintf(line, sizeof line, fmt, v);
    if (n > 0 && write(1, line, (size_t)n) < 0) {
        /* console gone: keep writing the disk anyway */
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s DEVICE [WRITES_PER_SEC [MAX_WRITES]]\n", argv[0]);
        return 2;
    }
    const char *dev = argv[1];
    uint64_t rate = argc > 2 ? strtoull(argv[2], NULL, 10) : 0;
    uint64_t max_writes = argc > 3 ? strtoull(argv[3], NULL, 10) : 0;

    int fd = open(dev, O_RDWR | O_DIRECT | O_DSYNC);
    if (fd < 0 && errno == EINVAL) {
        /* tmpfs and friends refuse O_DIRECT; O_DSYNC alone still means durable */
        fprintf(stderr, "diskwriter: %s: no O_DIRECT, using O_DSYNC only\n", dev);
        fd = open(dev, O_RDWR | O_DSYNC);
    }
    if (fd < 0) {
        fprintf(stderr, "diskwriter: open %s: %s\n", dev, strerror(errno));
        return 1;
    }

    uint64_t size = 0;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        size = (uint64_t)st.st_size;
    } else if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
        fprintf(stderr, "diskwriter: BLKGETSIZE64 %s: %s\n", dev, strerror(errno));
        return 1;
    }
    uint64_t nblocks = size / BLOCK;
    if (nblocks == 0) {
        fprintf(stderr, "diskwriter: %s is smaller than one block\n", dev);
        return 1;
    }

    uint8_t *buf;
    if (posix_memalign((void **)&buf, BLOCK, BLOCK) != 0) {
        fprintf(stderr, "diskwriter: out of memory\n");
        return 1;
    }
    crc_init();
    say("DISKWRITER nblocks=%llu\n", (unsigned long long)nblocks);

    int64_t start = now_ns();
    int64_t last_ack_ns = start;
    uint64_t unacked = 0;
    for (uint64_t seq = 1; max_writes == 0 || seq <= max_writes; seq++) {
        if (rate > 0) {
            int64_t due = start + (int64_t)((seq - 1) * 1000000000ULL / rate);
            struct timespec ts = {.tv_sec = due / 1000000000LL, .tv_nsec = due % 1000000000LL};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
            }
        }
        stamp(buf, seq, nblocks);
        off_t off = (off_t)((seq % nblocks) * BLOCK);
        ssize_t n;
        do {
            n = pwrite(fd, buf, BLOCK, off);
        } while (n < 0 && errno == EINTR);
        if (n != BLOCK) {
            fprintf(stderr, "diskwriter: pwrite seq %llu: %s\n", (unsigned long long)seq,
                    n < 0 ? strerror(errno) : "short write");
            return 1;
        }
        /* pwrite returned on an O_DSYNC fd: seq and everything before it is durable */
        unacked++;
        int64_t t = now_ns();
        if (unacked >= ACK_EVERY || t - last_ack_ns >= ACK_NS ||
            (max_writes != 0 && seq == max_writes)) {
            say("ACK %llu\n", (unsigned long long)seq);
            unacked = 0;
            last_ack_ns = t;
        }
    }
    return 0;
}

/*
 * fl_rows: per-row cross-entropy and logsumexp of raw float32 logits streamed on standard input, with
 * fastlogits' header-only C API. Each row is folded in chunks as it arrives, so a row never has to sit in
 * memory whole.
 *
 * Input: records of one little-endian int64 label followed by V float32 logits.
 * Output: one line per row, "loss lse", with %.9g.
 *
 *   cc -O2 -std=c99 -I"$(python -c 'import fastlogits; print(fastlogits.get_include())')" \
 *      fl_rows.c -o fl_rows -lm
 *   ./fl_rows 32000 < records.bin
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastlogits.h"

#define CHUNK 16384

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s V < records  (record: int64 label, then V float32 logits)\n", argv[0]);
        return 2;
    }
    char *end;
    errno = 0;
    long long V = strtoll(argv[1], &end, 10);
    if (errno || *end || V < 1) {
        fprintf(stderr, "fl_rows: V must be a positive integer, got '%s'\n", argv[1]);
        return 2;
    }
    static float buf[CHUNK];
    static char out[1 << 16];
    setvbuf(stdout, out, _IOFBF, sizeof out);
    for (long long row = 0;; row++) {
        int64_t label;
        size_t got = fread(&label, 1, sizeof label, stdin);
        if (got == 0 && feof(stdin)) break;
        if (got != sizeof label) {
            fprintf(stderr, "fl_rows: row %lld: truncated label (%zu of 8 bytes)\n", row, got);
            return 1;
        }
        if (label < 0 || label >= V) {
            fprintf(stderr, "fl_rows: row %lld: label %lld is out of range for V = %lld\n", row,
                    (long long)label, V);
            return 1;
        }
        fl_ce_state st;
        fl_ce_init(&st, label);
        for (long long start = 0; start < V; start += CHUNK) {
            size_t want = (size_t)(V - start < CHUNK ? V - start : CHUNK);
            size_t n = fread(buf, sizeof(float), want, stdin);
            if (n != want) {
                fprintf(stderr, "fl_rows: row %lld: truncated logits (%lld of %lld values)\n", row,
                        start + (long long)n, V);
                return 1;
            }
            fl_ce_update_f32(&st, buf, n, start);
        }
        printf("%.9g %.9g\n", fl_ce_result(&st), fl_lse_result(&st.lse));
    }
    return ferror(stdin) ? 1 : 0;
}

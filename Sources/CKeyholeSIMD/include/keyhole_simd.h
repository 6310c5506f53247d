#ifndef KEYHOLE_SIMD_H
#define KEYHOLE_SIMD_H

#include <stddef.h>
#include <stdint.h>

/// Index of the first byte of p[0..<n] equal to one of needles[0..<count] (count 1...4),
/// or n when there is none. AVX2 when the CPU has it, SSE2 otherwise (x86-64), portable C
/// elsewhere.
size_t keyhole_find_any(const uint8_t *p, size_t n, const uint8_t *needles, size_t count);

/// Where placeholders can start: up to 16 byte pairs (a third byte each, 0 for any), and the
/// placeholders themselves (concatenated, with their lengths) to rule a pair out by
/// decoding what follows it.
typedef struct {
    uint8_t firsts[16];
    uint8_t seconds[16];
    uint8_t thirds[16];
    /* The character that must start at offset 3 (0: no check), raw, or escaped: `\`, or `%`
       followed by its high hex digit (fourth_his). */
    uint8_t fourths[16];
    uint8_t fourth_his[16];
    /* Non-zero when the third byte is a hex digit of an escape (`%2` + `4`, `\u` + `0`), which
       cannot itself be escaped. */
    uint8_t third_strict[16];
    size_t count;
    const uint8_t *placeholders;
    const uint16_t *lengths;
    size_t placeholder_count;
} keyhole_pair_set;

/// Index of the first i in p[0..<n] where one of the set's pairs starts (and its third byte
/// follows, or an escape, or nothing yet) and a placeholder may start, decoding raw, `%XX`
/// and `\uXXXX` characters; an i = n-1 whose p[i] is a first byte counts too (undecided).
/// n when there is none.
size_t keyhole_find_pair(const uint8_t *p, size_t n, const keyhole_pair_set *set);

/// Two-byte candidates for `keyhole_find_pair_classes` ("shufti" on consecutive bytes): bucket
/// bits for the first byte (lo1/hi1) and for the byte after it (lo2/hi2); a candidate is an
/// i where some bucket has p[i] in its first set and p[i+1] in its second. A superset of
/// what the caller looks for: the caller checks each candidate.
typedef struct {
    uint8_t lo1[16];
    uint8_t hi1[16];
    uint8_t lo2[16];
    uint8_t hi2[16];
    /// Buckets whose first byte at the very end of the input counts (undecided).
    uint8_t any_at_end[256];
} keyhole_pair_classes;

/// Index of the first candidate in p[0..<n] (see keyhole_pair_classes), or n.
size_t keyhole_find_pair_classes(const uint8_t *p, size_t n, const keyhole_pair_classes *set);

/// Index of the first control byte (< 0x20 or 0x7F) of p[0..<n], or n.
size_t keyhole_find_control(const uint8_t *p, size_t n);

/// Index of the first byte of p[0..<n] that is not visible ASCII (<= 0x20 or >= 0x7F), or n.
size_t keyhole_find_nonvisible(const uint8_t *p, size_t n);

/// Splits an HTTP head into lines and validates its control bytes in one pass.
/// Writes the offset of each line's LF into lf_offsets (at most max_lines) and returns how
/// many lines were found (the head ends at its first empty line, which is included), or a
/// negative code: -1 bare LF, -2 bare CR, -3 NUL, -4 another control byte, -5 too many
/// lines, -6 the head is not complete yet (no empty line, or a CR at the very end).
/// *where receives the offending offset.
long keyhole_head_lines(const uint8_t *p, size_t n, uint32_t *lf_offsets, size_t max_lines, size_t *where);

/// The implementation chosen for this CPU ("avx2", "sse2" or "portable"), for benchmarks.
const char *keyhole_simd_implementation(void);

#endif

// SIMD byte-set scans for the substitution engine's hot loops. Swift's portable SIMD
// types cannot express movemask/ctz or per-function CPU targets; these few lines can, and
// they are what lets placeholder-free bytes stream at memchr-class speed.
#include "keyhole_simd.h"

#include <string.h>

static size_t find_any_portable(const uint8_t *p, size_t n, const uint8_t *needles, size_t count) {
    if (count == 1) {
        const uint8_t *hit = memchr(p, needles[0], n);
        return hit ? (size_t)(hit - p) : n;
    }
    for (size_t i = 0; i < n; i++) {
        for (size_t k = 0; k < count; k++) {
            if (p[i] == needles[k]) return i;
        }
    }
    return n;
}

static inline int hex_value(uint8_t b) {
    if (b >= '0' && b <= '9') return b - '0';
    if (b >= 'A' && b <= 'F') return b - 'A' + 10;
    if (b >= 'a' && b <= 'f') return b - 'a' + 10;
    return -1;
}

/* Whether a placeholder of the set may start at p[0] (raw, percent-encoded or JSON-escaped
   characters, as PlaceholderMatcher.decode reads them): 0 only when every placeholder is
   ruled out by a character that is there. Token boundaries are left to the caller. */
static int plausible(const uint8_t *p, size_t n, const keyhole_pair_set *set) {
    const uint8_t *placeholder = set->placeholders;
    for (size_t e = 0; e < set->placeholder_count; placeholder += set->lengths[e], e++) {
        size_t j = 0, k = 0, length = set->lengths[e];
        int ruled_out = 0;
        while (k < length) {
            if (j >= n) return 1;
            int c = p[j], w = 1;
            if (c == '%') {
                if (j + 2 >= n) return 1;
                int hi = hex_value(p[j + 1]), lo = hex_value(p[j + 2]);
                if (hi >= 0 && lo >= 0) { c = hi << 4 | lo; w = 3; }
            } else if (c == '\\') {
                if (j + 1 >= n) return 1;
                if (p[j + 1] == 'u') {
                    if (j + 5 >= n) return 1;
                    int value = 0, ok = 1;
                    for (int h = 2; h <= 5; h++) {
                        int v = hex_value(p[j + h]);
                        if (v < 0) { ok = 0; break; }
                        value = value << 4 | v;
                    }
                    if (ok && value < 0x80) { c = value; w = 6; }
                }
            }
            if (c != placeholder[k]) { ruled_out = 1; break; }
            j += (size_t)w;
            k++;
        }
        if (!ruled_out) return 1;
    }
    return 0;
}

/* Pair starts at i < limit; p has n bytes (a pair at the very end is incomplete: it counts). */
static size_t find_pair_scalar(const uint8_t *p, size_t limit, size_t n, const keyhole_pair_set *set) {
    for (size_t i = 0; i < limit; i++) {
        for (size_t k = 0; k < set->count; k++) {
            if (p[i] != set->firsts[k]) continue;
            if (i + 1 == n) return i;
            if (p[i + 1] != set->seconds[k]) continue;
            /* A third byte rules the pair out only when it is known, not 0 (no check), not an
               escape that may encode it, and different. */
            uint8_t third = set->thirds[k];
            if (third && i + 2 < n && p[i + 2] != third && (set->third_strict[k] || (p[i + 2] != '%' && p[i + 2] != '\\'))) continue;
            if (!plausible(p + i, n - i, set)) break;  /* no placeholder starts here */
            return i;
        }
    }
    return limit;
}

static size_t find_control_portable(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (p[i] < 0x20 || p[i] == 0x7F) return i;
    }
    return n;
}

static inline uint8_t pair_classes_first(const keyhole_pair_classes *set, uint8_t b) {
    return set->lo1[b & 15] & set->hi1[b >> 4];
}

static size_t find_pair_classes_portable(const uint8_t *p, size_t n, const keyhole_pair_classes *set) {
    for (size_t i = 0; i < n; i++) {
        uint8_t first = pair_classes_first(set, p[i]);
        if (!first) continue;
        if (i + 1 == n) {
            if (set->any_at_end[p[i]]) return i;
            continue;
        }
        if (first & set->lo2[p[i + 1] & 15] & set->hi2[p[i + 1] >> 4]) return i;
    }
    return n;
}

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2"))) static size_t find_pair_classes_avx2(const uint8_t *p, size_t n, const keyhole_pair_classes *set) {
    const __m256i lo1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)set->lo1));
    const __m256i hi1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)set->hi1));
    const __m256i lo2 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)set->lo2));
    const __m256i hi2 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)set->hi2));
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i zero = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 33 <= n; i += 32) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(p + i));
        __m256i y = _mm256_loadu_si256((const __m256i *)(p + i + 1));
        __m256i a = _mm256_and_si256(_mm256_shuffle_epi8(lo1, _mm256_and_si256(x, nibble)),
                                     _mm256_shuffle_epi8(hi1, _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble)));
        __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(lo2, _mm256_and_si256(y, nibble)),
                                     _mm256_shuffle_epi8(hi2, _mm256_and_si256(_mm256_srli_epi16(y, 4), nibble)));
        uint32_t none = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_and_si256(a, b), zero));
        if (~none) return i + (size_t)__builtin_ctz(~none);
    }
    return i + find_pair_classes_portable(p + i, n - i, set);
}

__attribute__((target("avx2"))) static size_t find_any_avx2(const uint8_t *p, size_t n, const uint8_t *needles, size_t count) {
    const __m256i a = _mm256_set1_epi8((char)needles[0]);
    const __m256i b = _mm256_set1_epi8((char)needles[count > 1 ? 1 : 0]);
    const __m256i c = _mm256_set1_epi8((char)needles[count > 2 ? 2 : 0]);
    const __m256i d = _mm256_set1_epi8((char)needles[count > 3 ? 3 : 0]);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(p + i));
        __m256i y = _mm256_loadu_si256((const __m256i *)(p + i + 32));
        __m256i mx = _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi8(x, a), _mm256_cmpeq_epi8(x, b)),
                                     _mm256_or_si256(_mm256_cmpeq_epi8(x, c), _mm256_cmpeq_epi8(x, d)));
        __m256i my = _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi8(y, a), _mm256_cmpeq_epi8(y, b)),
                                     _mm256_or_si256(_mm256_cmpeq_epi8(y, c), _mm256_cmpeq_epi8(y, d)));
        uint64_t mask = (uint32_t)_mm256_movemask_epi8(mx) | ((uint64_t)(uint32_t)_mm256_movemask_epi8(my) << 32);
        if (mask) return i + (size_t)__builtin_ctzll(mask);
    }
    for (; i + 32 <= n; i += 32) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(p + i));
        __m256i mx = _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi8(x, a), _mm256_cmpeq_epi8(x, b)),
                                     _mm256_or_si256(_mm256_cmpeq_epi8(x, c), _mm256_cmpeq_epi8(x, d)));
        uint32_t mask = (uint32_t)_mm256_movemask_epi8(mx);
        if (mask) return i + (size_t)__builtin_ctz(mask);
    }
    return i + find_any_portable(p + i, n - i, needles, count);
}

static size_t find_any_sse2(const uint8_t *p, size_t n, const uint8_t *needles, size_t count) {
    const __m128i a = _mm_set1_epi8((char)needles[0]);
    const __m128i b = _mm_set1_epi8((char)needles[count > 1 ? 1 : 0]);
    const __m128i c = _mm_set1_epi8((char)needles[count > 2 ? 2 : 0]);
    const __m128i d = _mm_set1_epi8((char)needles[count > 3 ? 3 : 0]);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(p + i));
        __m128i m = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, a), _mm_cmpeq_epi8(x, b)),
                                 _mm_or_si128(_mm_cmpeq_epi8(x, c), _mm_cmpeq_epi8(x, d)));
        int mask = _mm_movemask_epi8(m);
        if (mask) return i + (size_t)__builtin_ctz((unsigned)mask);
    }
    return i + find_any_portable(p + i, n - i, needles, count);
}

__attribute__((target("avx2"))) static size_t find_pair_avx2(const uint8_t *p, size_t n, const keyhole_pair_set *set) {
    const uint8_t *firsts = set->firsts, *seconds = set->seconds, *thirds = set->thirds, *fourths = set->fourths;
    size_t count = set->count;
    __m256i f[16], s[16], t[16], q[16], qh[16], d[4];
    const __m256i percent = _mm256_set1_epi8('%'), backslash = _mm256_set1_epi8('\\');
    size_t distinct = 0;
    uint8_t seen[4] = {0};
    for (size_t k = 0; k < 16; k++) {
        size_t j = k < count ? k : 0;
        f[k] = _mm256_set1_epi8((char)firsts[j]);
        s[k] = _mm256_set1_epi8((char)seconds[j]);
        t[k] = _mm256_set1_epi8((char)thirds[j]);
        q[k] = _mm256_set1_epi8((char)fourths[j]);
        qh[k] = _mm256_set1_epi8((char)set->fourth_his[j]);
    }
    /* The distinct first bytes, to skip blocks that hold none of them (up to 4; more:
       every block is checked pair by pair). */
    for (size_t k = 0; k < count && distinct <= 4; k++) {
        size_t j = 0;
        while (j < distinct && seen[j] != firsts[k]) j++;
        if (j == distinct) {
            if (distinct == 4) { distinct = 5; break; }
            seen[distinct] = firsts[k];
            d[distinct++] = _mm256_set1_epi8((char)firsts[k]);
        }
    }
    size_t i = 0;
    while (i + 36 <= n) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(p + i));
        if (distinct <= 4) {
            __m256i any = _mm256_cmpeq_epi8(x, d[0]);
            for (size_t j = 1; j < distinct; j++) any = _mm256_or_si256(any, _mm256_cmpeq_epi8(x, d[j]));
            if (_mm256_movemask_epi8(any) == 0) { i += 32; continue; }
        }
        __m256i y = _mm256_loadu_si256((const __m256i *)(p + i + 1));
        __m256i pairs[16];
        __m256i m = _mm256_setzero_si256();
        for (size_t k = 0; k < count; k++) {
            pairs[k] = _mm256_and_si256(_mm256_cmpeq_epi8(x, f[k]), _mm256_cmpeq_epi8(y, s[k]));
            m = _mm256_or_si256(m, pairs[k]);
        }
        if (_mm256_movemask_epi8(m) == 0) { i += 32; continue; }
        /* Pairs found: their third bytes (or an escape that may encode one) must follow. */
        __m256i z = _mm256_loadu_si256((const __m256i *)(p + i + 2));
        __m256i escape = _mm256_or_si256(_mm256_cmpeq_epi8(z, percent), _mm256_cmpeq_epi8(z, backslash));
        /* Offset 3 starts the next character: raw, `\`, or `%` and its high hex digit. */
        __m256i w = _mm256_loadu_si256((const __m256i *)(p + i + 3));
        __m256i v = _mm256_loadu_si256((const __m256i *)(p + i + 4));
        __m256i wpercent = _mm256_cmpeq_epi8(w, percent), wbackslash = _mm256_cmpeq_epi8(w, backslash);
        m = _mm256_setzero_si256();
        for (size_t k = 0; k < count; k++) {
            __m256i pair = pairs[k];
            if (thirds[k]) {
                /* The third byte raw (then the fourth is checked too), or an escape. */
                __m256i third = _mm256_cmpeq_epi8(z, t[k]);
                if (fourths[k]) {
                    __m256i ok = _mm256_or_si256(_mm256_cmpeq_epi8(w, q[k]), wbackslash);
                    ok = _mm256_or_si256(ok, _mm256_and_si256(wpercent, _mm256_cmpeq_epi8(v, qh[k])));
                    third = _mm256_and_si256(third, ok);
                }
                pair = _mm256_and_si256(pair, set->third_strict[k] ? third : _mm256_or_si256(third, escape));
            }
            m = _mm256_or_si256(m, pair);
        }
        uint32_t mask = (uint32_t)_mm256_movemask_epi8(m);
        while (mask) {
            size_t at = i + (size_t)__builtin_ctz(mask);
            /* The vector compare checked the pair and its third byte: decode what follows. */
            if (plausible(p + at, n - at, set)) return at;
            mask &= mask - 1;
        }
        i += 32;
    }
    return i + find_pair_scalar(p + i, n - i, n - i, set);
}

static size_t find_pair_sse2(const uint8_t *p, size_t n, const keyhole_pair_set *set) {
    const uint8_t *firsts = set->firsts, *seconds = set->seconds;
    size_t count = set->count;
    __m128i f[16], s[16];
    for (size_t k = 0; k < 16; k++) {
        f[k] = _mm_set1_epi8((char)firsts[k < count ? k : 0]);
        s[k] = _mm_set1_epi8((char)seconds[k < count ? k : 0]);
    }
    size_t i = 0;
    for (; i + 17 <= n; i += 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(p + i));
        __m128i y = _mm_loadu_si128((const __m128i *)(p + i + 1));
        __m128i m = _mm_and_si128(_mm_cmpeq_epi8(x, f[0]), _mm_cmpeq_epi8(y, s[0]));
        for (size_t k = 1; k < count; k++) {
            m = _mm_or_si128(m, _mm_and_si128(_mm_cmpeq_epi8(x, f[k]), _mm_cmpeq_epi8(y, s[k])));
        }
        int mask = _mm_movemask_epi8(m);
        while (mask) {
            size_t at = i + (size_t)__builtin_ctz((unsigned)mask);
            if (find_pair_scalar(p + at, 1, n - at, set) == 0) return at;
            mask &= mask - 1;
        }
    }
    return i + find_pair_scalar(p + i, n - i, n - i, set);
}

__attribute__((target("avx2"))) static size_t find_control_avx2(const uint8_t *p, size_t n) {
    // A byte is a control byte when (byte + 0x80 as signed) < (0x20 + 0x80) signed, or == 0x7F.
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    const __m256i limit = _mm256_set1_epi8((char)(0x20 ^ 0x80));
    const __m256i del = _mm256_set1_epi8(0x7F);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(p + i));
        __m256i low = _mm256_cmpgt_epi8(limit, _mm256_xor_si256(x, bias));
        __m256i m = _mm256_or_si256(low, _mm256_cmpeq_epi8(x, del));
        uint32_t mask = (uint32_t)_mm256_movemask_epi8(m);
        if (mask) return i + (size_t)__builtin_ctz(mask);
    }
    return i + find_control_portable(p + i, n - i);
}

static size_t find_control_sse2(const uint8_t *p, size_t n) {
    const __m128i bias = _mm_set1_epi8((char)0x80);
    const __m128i limit = _mm_set1_epi8((char)(0x20 ^ 0x80));
    const __m128i del = _mm_set1_epi8(0x7F);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(p + i));
        __m128i low = _mm_cmpgt_epi8(limit, _mm_xor_si128(x, bias));
        int mask = _mm_movemask_epi8(_mm_or_si128(low, _mm_cmpeq_epi8(x, del)));
        if (mask) return i + (size_t)__builtin_ctz((unsigned)mask);
    }
    return i + find_control_portable(p + i, n - i);
}

static int has_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return cached;
}

size_t keyhole_find_any(const uint8_t *p, size_t n, const uint8_t *needles, size_t count) {
    if (count == 1) return find_any_portable(p, n, needles, 1);  // libc memchr is already vectorised
    return has_avx2() ? find_any_avx2(p, n, needles, count) : find_any_sse2(p, n, needles, count);
}

size_t keyhole_find_control(const uint8_t *p, size_t n) {
    return has_avx2() ? find_control_avx2(p, n) : find_control_sse2(p, n);
}

size_t keyhole_find_pair_classes(const uint8_t *p, size_t n, const keyhole_pair_classes *set) {
    return has_avx2() ? find_pair_classes_avx2(p, n, set) : find_pair_classes_portable(p, n, set);
}

size_t keyhole_find_pair(const uint8_t *p, size_t n, const keyhole_pair_set *set) {
    /* Candidate-dense input finds its next candidate within a few bytes: look at the first
       64 bytes one by one before paying for the vector set-up. */
    size_t head = n < 64 ? n : 64;
    size_t found = find_pair_scalar(p, head, n, set);
    if (found < head || head == n) return found;
    return head + (has_avx2() ? find_pair_avx2(p + head, n - head, set) : find_pair_sse2(p + head, n - head, set));
}

#endif

size_t keyhole_find_nonvisible(const uint8_t *p, size_t n) {
    size_t i = 0;
#if defined(__SSE2__)
    /* Signed compare trick: visible bytes 0x21..0x7E are exactly those with
       (b ^ 0x80) in (0x20 ^ 0x80, 0x7F ^ 0x80) as signed values. */
    const __m128i bias = _mm_set1_epi8((char)0x80);
    const __m128i lo = _mm_set1_epi8((char)(0x20 ^ 0x80));
    const __m128i hi = _mm_set1_epi8((char)(0x7F ^ 0x80));
    for (; i + 16 <= n; i += 16) {
        __m128i x = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(p + i)), bias);
        __m128i visible = _mm_and_si128(_mm_cmpgt_epi8(x, lo), _mm_cmpgt_epi8(hi, x));
        int mask = ~_mm_movemask_epi8(visible) & 0xFFFF;
        if (mask) return i + (size_t)__builtin_ctz((unsigned)mask);
    }
#endif
    for (; i < n; i++) {
        if (p[i] <= 0x20 || p[i] >= 0x7F) return i;
    }
    return n;
}

/* Classifies one control byte at k; returns 0 to go on, 1 when the head ended, or a
   negative code. */
static inline long head_control(const uint8_t *p, size_t n, size_t k, uint32_t *lf_offsets, size_t max_lines,
                                size_t *lines, size_t *line_start, size_t *where) {
    uint8_t c = p[k];
    if (c == 0x0A) {
        if (k == 0 || p[k - 1] != 0x0D) { *where = k; return -1; }
        if (*lines == max_lines) { *where = k; return -5; }
        lf_offsets[(*lines)++] = (uint32_t)k;
        if (k - *line_start == 1) return 1; /* CRLF alone: end of head */
        *line_start = k + 1;
        return 0;
    }
    if (c == 0x0D) {
        if (k + 1 >= n) { *where = n; return -6; } /* its LF has not arrived yet */
        if (p[k + 1] != 0x0A) { *where = k; return -2; }
        return 0;
    }
    if (c == 0x09) return 0;
    *where = k;
    return c == 0 ? -3 : -4;
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) static long head_lines_avx2(const uint8_t *p, size_t n, uint32_t *lf_offsets, size_t max_lines, size_t *where) {
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    const __m256i limit = _mm256_set1_epi8((char)(0x20 ^ 0x80));
    const __m256i del = _mm256_set1_epi8(0x7F);
    size_t lines = 0, line_start = 0, i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(p + i));
        uint32_t mask = (uint32_t)_mm256_movemask_epi8(
            _mm256_or_si256(_mm256_cmpgt_epi8(limit, _mm256_xor_si256(x, bias)), _mm256_cmpeq_epi8(x, del)));
        while (mask) {
            size_t k = i + (size_t)__builtin_ctz(mask);
            mask &= mask - 1;
            long r = head_control(p, n, k, lf_offsets, max_lines, &lines, &line_start, where);
            if (r == 1) return (long)lines;
            if (r < 0) return r;
        }
    }
    for (; i < n; i++) {
        if (p[i] >= 0x20 && p[i] != 0x7F) continue;
        long r = head_control(p, n, i, lf_offsets, max_lines, &lines, &line_start, where);
        if (r == 1) return (long)lines;
        if (r < 0) return r;
    }
    *where = n;
    return -6;
}
#endif

static long head_lines_portable(const uint8_t *p, size_t n, uint32_t *lf_offsets, size_t max_lines, size_t *where) {
    size_t lines = 0, line_start = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] >= 0x20 && p[i] != 0x7F) continue;
        long r = head_control(p, n, i, lf_offsets, max_lines, &lines, &line_start, where);
        if (r == 1) return (long)lines;
        if (r < 0) return r;
    }
    *where = n;
    return -6;
}

long keyhole_head_lines(const uint8_t *p, size_t n, uint32_t *lf_offsets, size_t max_lines, size_t *where) {
#if defined(__x86_64__)
    if (has_avx2()) return head_lines_avx2(p, n, lf_offsets, max_lines, where);
#endif
    return head_lines_portable(p, n, lf_offsets, max_lines, where);
}

#if defined(__x86_64__)

const char *keyhole_simd_implementation(void) { return has_avx2() ? "avx2" : "sse2"; }

#else

size_t keyhole_find_any(const uint8_t *p, size_t n, const uint8_t *needles, size_t count) {
    return find_any_portable(p, n, needles, count);
}

size_t keyhole_find_control(const uint8_t *p, size_t n) { return find_control_portable(p, n); }

size_t keyhole_find_pair_classes(const uint8_t *p, size_t n, const keyhole_pair_classes *set) {
    return find_pair_classes_portable(p, n, set);
}

size_t keyhole_find_pair(const uint8_t *p, size_t n, const keyhole_pair_set *set) {
    return find_pair_scalar(p, n, n, set);
}

const char *keyhole_simd_implementation(void) { return "portable"; }

#endif

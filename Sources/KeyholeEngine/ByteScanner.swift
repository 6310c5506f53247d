import CKeyholeSIMD

/// Finds the next byte that belongs to a small set (the bytes a placeholder can start with
/// in any of its forms): AVX2 or SSE2 compare + movemask, or libc `memchr` for one byte.
struct ByteScanner: Sendable {
    private let packed: (UInt8, UInt8, UInt8, UInt8)
    let count: Int

    init(_ set: [UInt8]) {
        var unique: [UInt8] = []
        for byte in set where !unique.contains(byte) { unique.append(byte) }
        precondition(!unique.isEmpty && unique.count <= 4, "ByteScanner handles 1 to 4 distinct bytes")
        count = unique.count
        let padded = unique + [UInt8](repeating: unique[0], count: 4 - unique.count)
        packed = (padded[0], padded[1], padded[2], padded[3])
    }

    var needles: [UInt8] { Array([packed.0, packed.1, packed.2, packed.3].prefix(count)) }

    /// Index of the first needle in `bytes[from...]`, or nil.
    @inline(__always)
    func firstIndex(in bytes: UnsafeRawBufferPointer, from: Int) -> Int? {
        guard from < bytes.count, let base = bytes.baseAddress else { return nil }
        let remaining = bytes.count - from
        let found = withUnsafeBytes(of: packed) { needles in
            keyhole_find_any(base.assumingMemoryBound(to: UInt8.self) + from, remaining, needles.baseAddress!.assumingMemoryBound(to: UInt8.self), count)
        }
        return found == remaining ? nil : from + found
    }
}

/// Finds the next position where one of up to sixteen byte pairs starts (AVX2 or SSE2): a
/// placeholder's first two characters in each form it can be written in. A run of one
/// candidate byte (`$$$$`, `%%%%`) then costs what plain bytes cost.
struct PairScanner: Sendable {
    /// The C side's table, made once per matcher and freed with it.
    final class Table: @unchecked Sendable {
        let set: UnsafeMutablePointer<keyhole_pair_set>
        let placeholders: UnsafeMutablePointer<UInt8>
        let lengths: UnsafeMutablePointer<UInt16>

        init(pairs: [(UInt8, UInt8, UInt8, UInt8)], placeholders list: [[UInt8]]) {
            set = .allocate(capacity: 1)
            set.initialize(to: keyhole_pair_set())
            let total = list.reduce(0) { $0 + $1.count }
            placeholders = .allocate(capacity: max(1, total))
            lengths = .allocate(capacity: max(1, list.count))
            var offset = 0
            for (index, placeholder) in list.enumerated() {
                for (k, byte) in placeholder.enumerated() { placeholders[offset + k] = byte }
                offset += placeholder.count
                lengths[index] = UInt16(placeholder.count)
            }
            let hex = Array("0123456789ABCDEF".utf8)
            withUnsafeMutableBytes(of: &set.pointee.firsts) { f in
                withUnsafeMutableBytes(of: &set.pointee.seconds) { s in
                    withUnsafeMutableBytes(of: &set.pointee.thirds) { t in
                        withUnsafeMutableBytes(of: &set.pointee.fourths) { q in
                            withUnsafeMutableBytes(of: &set.pointee.fourth_his) { qh in
                                withUnsafeMutableBytes(of: &set.pointee.third_strict) { strict in
                                    for (k, pair) in pairs.enumerated() {
                                        f[k] = pair.0
                                        s[k] = pair.1
                                        t[k] = pair.2
                                        q[k] = pair.2 == 0 ? 0 : pair.3
                                        qh[k] = hex[Int(pair.3 >> 4)]
                                        // `%` + digit + digit, `\u` + `0`: the third byte is a digit.
                                        strict[k] = (pair.0 == 0x25 || (pair.0 == 0x5C && pair.1 == 0x75)) ? 1 : 0
                                    }
                                }
                            }
                        }
                    }
                }
            }
            set.pointee.count = pairs.count
            set.pointee.placeholders = UnsafePointer(placeholders)
            set.pointee.lengths = UnsafePointer(lengths)
            set.pointee.placeholder_count = list.count
        }

        deinit {
            set.deallocate()
            placeholders.deallocate()
            lengths.deallocate()
        }
    }

    let table: Table

    /// `pairs`: first, second, a third byte that must follow (0: any), and the character
    /// that starts right after a raw third byte (0: any); `placeholders`: their raw bytes.
    init?(_ pairs: [(UInt8, UInt8, UInt8, UInt8)], placeholders: [[UInt8]]) {
        guard !pairs.isEmpty, pairs.count <= 16, placeholders.allSatisfy({ $0.count <= Int(UInt16.max) }) else { return nil }
        table = Table(pairs: pairs, placeholders: placeholders)
    }

    /// Index of the first plausible placeholder start in `bytes[from...]` (a first byte at
    /// the very end counts), or nil.
    @inline(__always)
    func firstIndex(in bytes: UnsafeRawBufferPointer, from: Int) -> Int? {
        guard from < bytes.count, let base = bytes.baseAddress else { return nil }
        let remaining = bytes.count - from
        let found = keyhole_find_pair(base.assumingMemoryBound(to: UInt8.self) + from, remaining, table.set)
        return found == remaining ? nil : from + found
    }
}

/// Finds control bytes (< 0x20 or 0x7F) — CR, LF, HTAB and the forbidden ones — in a
/// header block.
enum ControlScanner {
    @inline(__always)
    static func firstIndex(in bytes: UnsafeRawBufferPointer, from: Int) -> Int? {
        guard from < bytes.count, let base = bytes.baseAddress else { return nil }
        let remaining = bytes.count - from
        let found = keyhole_find_control(base.assumingMemoryBound(to: UInt8.self) + from, remaining)
        return found == remaining ? nil : from + found
    }

    /// "avx2", "sse2" or "portable".
    static var implementation: String { String(cString: keyhole_simd_implementation()) }
}

/// Which SIMD implementation the engine's scans use on this CPU ("avx2", "sse2", "portable").
public enum EngineSIMD {
    public static var implementation: String { ControlScanner.implementation }
}

/// Finds where a real value may start, by its first two bytes in any form it can take
/// (AVX2 nibble tables on consecutive bytes, "shufti"; a table walk elsewhere). Each bucket
/// is a set of first bytes and a set of second bytes; up to eight buckets, merged past that
/// (a superset, which the caller's full match rules out).
struct PairClassScanner: Sendable {
    final class Table: @unchecked Sendable {
        let set: UnsafeMutablePointer<keyhole_pair_classes>

        init(_ buckets: [(first: [UInt8], second: [UInt8])]) {
            set = .allocate(capacity: 1)
            set.initialize(to: keyhole_pair_classes())
            withUnsafeMutableBytes(of: &set.pointee.lo1) { lo1 in
                withUnsafeMutableBytes(of: &set.pointee.hi1) { hi1 in
                    withUnsafeMutableBytes(of: &set.pointee.lo2) { lo2 in
                        withUnsafeMutableBytes(of: &set.pointee.hi2) { hi2 in
                            withUnsafeMutableBytes(of: &set.pointee.any_at_end) { end in
                                for (index, bucket) in buckets.enumerated() {
                                    let bit = UInt8(1) << UInt8(index % 8)
                                    for byte in bucket.first {
                                        lo1[Int(byte & 15)] |= bit
                                        hi1[Int(byte >> 4)] |= bit
                                        end[Int(byte)] = 1
                                    }
                                    for byte in bucket.second {
                                        lo2[Int(byte & 15)] |= bit
                                        hi2[Int(byte >> 4)] |= bit
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }

        deinit { set.deallocate() }
    }

    let table: Table

    init(_ buckets: [(first: [UInt8], second: [UInt8])]) {
        table = Table(buckets)
    }

    @inline(__always)
    func firstIndex(in bytes: UnsafeRawBufferPointer, from: Int) -> Int? {
        guard from < bytes.count, let base = bytes.baseAddress else { return nil }
        let remaining = bytes.count - from
        let found = keyhole_find_pair_classes(base.assumingMemoryBound(to: UInt8.self) + from, remaining, table.set)
        return found == remaining ? nil : from + found
    }
}

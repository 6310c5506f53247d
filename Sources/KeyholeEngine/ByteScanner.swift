#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Finds the next byte that belongs to a small set (the bytes a placeholder can start with
/// in any of its forms). One byte: libc `memchr`. Up to four: a 64-byte-per-step SIMD
/// compare, which runs at well over a third of `memchr` speed (see bench/).
struct ByteScanner: Sendable {
    let needles: [UInt8]
    private let n0: UInt8
    private let n1: UInt8
    private let n2: UInt8
    private let n3: UInt8

    init(_ set: [UInt8]) {
        var unique: [UInt8] = []
        for byte in set where !unique.contains(byte) { unique.append(byte) }
        precondition(!unique.isEmpty && unique.count <= 4, "ByteScanner handles 1 to 4 distinct bytes")
        needles = unique
        n0 = unique[0]
        // Unused lanes repeat the first needle, so the compare stays branch-free.
        n1 = unique.count > 1 ? unique[1] : unique[0]
        n2 = unique.count > 2 ? unique[2] : unique[0]
        n3 = unique.count > 3 ? unique[3] : unique[0]
    }

    /// Index of the first needle in `bytes[from...]`, or nil.
    @inline(__always)
    func firstIndex(in bytes: UnsafeRawBufferPointer, from: Int) -> Int? {
        guard from < bytes.count, let base = bytes.baseAddress else { return nil }
        if needles.count == 1 {
            guard let hit = memchr(base + from, Int32(n0), bytes.count - from) else { return nil }
            return base.distance(to: UnsafeRawPointer(hit))
        }
        return simdFirstIndex(base, count: bytes.count, from: from)
    }

    @inline(__always)
    private func isNeedle(_ byte: UInt8) -> Bool {
        byte == n0 || byte == n1 || byte == n2 || byte == n3
    }

    private func simdFirstIndex(_ base: UnsafeRawPointer, count: Int, from: Int) -> Int? {
        var i = from
        let v0 = SIMD32<UInt8>(repeating: n0)
        let v1 = SIMD32<UInt8>(repeating: n1)
        let v2 = SIMD32<UInt8>(repeating: n2)
        let v3 = SIMD32<UInt8>(repeating: n3)
        while i + 64 <= count {
            let a = base.loadUnaligned(fromByteOffset: i, as: SIMD32<UInt8>.self)
            let b = base.loadUnaligned(fromByteOffset: i + 32, as: SIMD32<UInt8>.self)
            let ma = (a .== v0) .| (a .== v1) .| (a .== v2) .| (a .== v3)
            let mb = (b .== v0) .| (b .== v1) .| (b .== v2) .| (b .== v3)
            if any(ma .| mb) { break }
            i += 64
        }
        let bytes = base.assumingMemoryBound(to: UInt8.self)
        while i < count {
            if isNeedle(bytes[i]) { return i }
            i += 1
        }
        return nil
    }
}

/// Finds control bytes (< 0x20 or 0x7F) — CR, LF, HTAB and the forbidden ones — in a
/// header block, 64 bytes per step.
enum ControlScanner {
    @inline(__always)
    static func firstIndex(in bytes: UnsafeRawBufferPointer, from: Int) -> Int? {
        guard let base = bytes.baseAddress else { return nil }
        let count = bytes.count
        var i = from
        let space = SIMD32<UInt8>(repeating: 0x20)
        let del = SIMD32<UInt8>(repeating: 0x7F)
        while i + 64 <= count {
            let a = base.loadUnaligned(fromByteOffset: i, as: SIMD32<UInt8>.self)
            let b = base.loadUnaligned(fromByteOffset: i + 32, as: SIMD32<UInt8>.self)
            let m = (a .< space) .| (a .== del) .| (b .< space) .| (b .== del)
            if any(m) { break }
            i += 64
        }
        while i < count {
            let byte = bytes[i]
            if byte < 0x20 || byte == 0x7F { return i }
            i += 1
        }
        return nil
    }
}

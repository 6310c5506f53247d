/// How a placeholder was written.
public enum PlaceholderForm: String, Sendable, Hashable {
    /// `$MSB_TOKEN`
    case raw
    /// Some or all characters as `%XX` (`%24MSB_TOKEN`), as URL encoders write it.
    case percentEncoded = "percent-encoded"
    /// Some or all characters as JSON `\uXXXX` escapes (`\u0024MSB_TOKEN`).
    case jsonEscaped = "json-escaped"
    /// Inside the base64 `user:pass` of `Authorization: Basic`.
    case base64
}

/// A set of bytes as a 256-bit bitmap in four words, picked with selects rather than a
/// jump table or a memory load.
struct ByteSet: Sendable {
    private var w0: UInt64 = 0, w1: UInt64 = 0, w2: UInt64 = 0, w3: UInt64 = 0

    @inline(__always)
    func contains(_ byte: UInt8) -> Bool {
        let low = byte & 0x40 == 0
        let word = byte & 0x80 == 0 ? (low ? w0 : w1) : (low ? w2 : w3)
        return (word >> UInt64(byte & 63)) & 1 != 0
    }

    mutating func insert(_ byte: UInt8) {
        let bit = UInt64(1) << UInt64(byte & 63)
        switch byte >> 6 {
        case 0: w0 |= bit
        case 1: w1 |= bit
        case 2: w2 |= bit
        default: w3 |= bit
        }
    }

    mutating func insertAll() { (w0, w1, w2, w3) = (~0, ~0, ~0, ~0) }
}

/// Finds configured placeholders, in raw, percent-encoded and JSON-escaped form, as whole
/// tokens: `$MSB_A` does not match inside `$MSB_AB` or `x_MSB_A`-style runs.
///
/// Work is split in two: a SIMD scan for the few bytes a placeholder can start with in any
/// form (its first byte, `%`, `\`), and a short decode-and-compare at each such byte.
///
/// A class: immutable, built once per policy (`SecretSet`) and referenced by every
/// connection's rewriter and scanners, so none carries its own copy of its 170-odd bytes.
public final class PlaceholderMatcher: Sendable {
    struct Entry: Sendable {
        let bytes: [UInt8]
        let secret: Int
        let checkBefore: Bool
        let checkAfter: Bool
    }

    enum Result: Equatable {
        case none
        /// The bytes available end before a decision can be made.
        case needMore
        case match(secret: Int, form: PlaceholderForm, length: Int)
    }

    let entries: [Entry]
    let scanner: ByteScanner
    /// The most bytes a decision at one candidate may need (the longest placeholder fully
    /// JSON-escaped, plus one escaped character after it for the token boundary).
    public let lookahead: Int

    public init(placeholders: [[UInt8]]) {
        var entries: [Entry] = []
        var starts: [UInt8] = [UInt8(ascii: "%"), UInt8(ascii: "\\")]
        var longest = 1
        for (index, bytes) in placeholders.enumerated() where !bytes.isEmpty {
            entries.append(
                Entry(bytes: bytes, secret: index, checkBefore: Self.isTokenByte(bytes.first!), checkAfter: Self.isTokenByte(bytes.last!)))
            if !starts.contains(bytes[0]) { starts.append(bytes[0]) }
            longest = max(longest, bytes.count)
        }
        // Placeholders starting with more than two distinct bytes are rare (custom ones);
        // fall back to scanning for their common escape bytes plus the first two starts.
        self.entries = entries
        self.scanner = ByteScanner(Array(starts.prefix(4)))
        self.lookahead = 6 * (longest + 1)
        self.extraStarts = starts.count > 4 ? Array(starts.dropFirst(4)) : []
        var startSet = ByteSet()
        for byte in starts { startSet.insert(byte) }
        self.startSet = startSet
        var firstBytes = ByteSet()
        var secondBytes = ByteSet()
        var unguardedFirst = ByteSet()
        for entry in entries {
            firstBytes.insert(entry.bytes[0])
            if entry.bytes.count > 1 { secondBytes.insert(entry.bytes[1]) } else { secondBytes.insertAll() }
            if !entry.checkBefore { unguardedFirst.insert(entry.bytes[0]) }
        }
        self.firstBytes = firstBytes
        self.secondBytes = secondBytes
        self.unguardedFirst = unguardedFirst
        // The pairs a placeholder can start with: its first two characters raw, its first
        // raw and its second escaped, its first percent-encoded (`%` and the high hex digit,
        // either case) or JSON-escaped (`\u`).
        // With a raw third byte, the character after it is known too (the vector filter
        // checks it: raw, or the start of its escape).
        var pairs: [(UInt8, UInt8, UInt8, UInt8)] = []
        func add(_ a: UInt8, _ b: UInt8, _ c: UInt8 = 0, _ d: UInt8 = 0) {
            if let k = pairs.firstIndex(where: { $0.0 == a && $0.1 == b }) {
                if pairs[k].2 != c { pairs[k].2 = 0 }  // two different thirds: check none
                if pairs[k].3 != d { pairs[k].3 = 0 }
            } else {
                pairs.append((a, b, c, d))
            }
        }
        let hex = Array("0123456789ABCDEF".utf8)
        for entry in entries where entry.bytes.count > 2 {
            let first = entry.bytes[0]
            add(first, entry.bytes[1], entry.bytes[2], entry.bytes.count > 3 ? entry.bytes[3] : 0)
            add(first, UInt8(ascii: "%"))
            add(first, UInt8(ascii: "\\"))
            let high = hex[Int(first >> 4)], low = hex[Int(first & 0x0F)]
            // `%` + the high hex digit (either case) + the low one (a letter: either case, so no
            // check); then the placeholder's second character.
            let third = low >= UInt8(ascii: "A") ? 0 : low
            add(UInt8(ascii: "%"), high, third, entry.bytes[1])
            if high >= UInt8(ascii: "A") { add(UInt8(ascii: "%"), high | 0x20, third, entry.bytes[1]) }
        }
        add(UInt8(ascii: "\\"), UInt8(ascii: "u"), UInt8(ascii: "0"), 0)  // `\u00XX`: placeholders are ASCII
        self.pairScanner = entries.allSatisfy({ $0.bytes.count > 2 }) ? PairScanner(pairs, placeholders: entries.map(\.bytes)) : nil
    }

    /// Where placeholders can start, by their first two bytes; nil when they need more
    /// than sixteen pairs (then `nextCandidate` and `certainlyNone` do the work).
    let pairScanner: PairScanner?

    /// Every byte a candidate can be (the SIMD set plus `extraStarts`).
    let startSet: ByteSet
    /// First and second characters of the placeholders (decoded).
    let firstBytes: ByteSet
    let secondBytes: ByteSet
    /// First characters of placeholders that need no token boundary before them.
    let unguardedFirst: ByteSet

    /// Whether the candidate at `c` certainly starts no placeholder, judged from at most
    /// six bytes (conservative: false whenever it cannot tell, and the full `match`
    /// decides). This keeps every byte pattern cheap: a body of nothing but `%`, `$`, `\`
    /// or a custom placeholder's first letter is rejected here, byte after byte, without
    /// the full decode-and-compare.
    @inline(__always)
    func certainlyNone(_ bytes: UnsafeRawBufferPointer, at c: Int, previous: UInt8?) -> Bool {
        let count = bytes.count
        let b = bytes[c]
        if b == 0x25 {  // %
            guard c + 2 < count else { return false }
            guard let hi = Self.hexValue(bytes[c + 1]), let lo = Self.hexValue(bytes[c + 2]) else { return !firstBytes.contains(b) }
            return !firstBytes.contains(hi << 4 | lo)
        }
        if b == 0x5C {  // backslash
            guard c + 1 < count else { return false }
            guard bytes[c + 1] == 0x75 else { return !firstBytes.contains(b) }
            guard c + 5 < count else { return false }
            var value: UInt32 = 0
            for k in 2...5 {
                guard let h = Self.hexValue(bytes[c + k]) else { return !firstBytes.contains(b) }
                value = value << 4 | UInt32(h)
            }
            return value >= 0x80 || !firstBytes.contains(UInt8(value))
        }
        if !firstBytes.contains(b) { return true }
        // Every placeholder starting with `b` needs a token boundary, and there is none.
        if !unguardedFirst.contains(b), let previous, Self.isTokenByte(previous) { return true }
        guard c + 1 < count else { return false }
        let next = bytes[c + 1]
        if next == 0x25 || next == 0x5C { return false }  // the second character may be encoded
        if !secondBytes.contains(next) { return true }
        // Compare the raw bytes that follow with each placeholder starting with `b`.
        for entry in entries where entry.bytes[0] == b {
            if entry.checkBefore, let previous, Self.isTokenByte(previous) { continue }
            var k = 1
            while k < entry.bytes.count {
                guard c + k < count else { return false }
                let x = bytes[c + k]
                if x == 0x25 || x == 0x5C { return false }
                if x != entry.bytes[k] { break }
                k += 1
            }
            if k == entry.bytes.count { return false }  // all of it is there: the full match decides
        }
        return true
    }

    /// The next candidate from `from` that `certainlyNone` cannot rule out, or nil. Runs of
    /// candidate bytes are walked with a table lookup each, not a SIMD call each.
    @inline(__always)
    func nextPlausibleCandidate(in bytes: UnsafeRawBufferPointer, from: Int, previous: UInt8?) -> Int? {
        if let pairScanner {
            var i = from
            while let c = pairScanner.firstIndex(in: bytes, from: i) {
                if !certainlyNone(bytes, at: c, previous: c > 0 ? bytes[c - 1] : previous) { return c }
                i = c + 1
            }
            return nil
        }
        var i = from
        while let c = nextCandidate(in: bytes, from: i) {
            var k = c
            while k < bytes.count, startSet.contains(bytes[k]) {
                if !certainlyNone(bytes, at: k, previous: k > 0 ? bytes[k - 1] : previous) { return k }
                k += 1
            }
            i = k
        }
        return nil
    }

    /// Start bytes beyond what the SIMD scanner covers; checked with a second pass.
    let extraStarts: [UInt8]

    @inline(__always)
    static func isTokenByte(_ b: UInt8) -> Bool {
        (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x5F
    }

    /// Index of the first byte at which a placeholder could start (benchmarks, tools).
    public func firstCandidate(in bytes: UnsafeRawBufferPointer) -> Int? {
        nextCandidate(in: bytes, from: 0)
    }

    /// Index of the next byte at which a placeholder could start, from `from`.
    @inline(__always)
    func nextCandidate(in bytes: UnsafeRawBufferPointer, from: Int) -> Int? {
        let hit = scanner.firstIndex(in: bytes, from: from)
        guard !extraStarts.isEmpty else { return hit }
        let end = hit ?? bytes.count
        var i = from
        while i < end {
            if extraStarts.contains(bytes[i]) { return i }
            i += 1
        }
        return hit
    }

    @inline(__always)
    static func hexValue(_ b: UInt8) -> UInt8? {
        switch b {
        case 0x30...0x39: return b - 0x30
        case 0x41...0x46: return b - 0x41 + 10
        case 0x61...0x66: return b - 0x61 + 10
        default: return nil
        }
    }

    enum Decoded {
        case char(UInt8, width: Int, form: PlaceholderForm)
        case needMore
        case end
    }

    /// Decodes one character at `i`: raw, `%XX`, or `\uXXXX` (ASCII only).
    @inline(__always)
    static func decode(_ bytes: UnsafeRawBufferPointer, _ i: Int, final: Bool) -> Decoded {
        let count = bytes.count
        guard i < count else { return final ? .end : .needMore }
        let b = bytes[i]
        if b == 0x25 {  // %
            guard i + 2 < count else {
                if final { return .char(b, width: 1, form: .raw) }
                // Decide early when what we have already rules out an escape.
                if i + 1 < count, hexValue(bytes[i + 1]) == nil { return .char(b, width: 1, form: .raw) }
                return .needMore
            }
            if let hi = hexValue(bytes[i + 1]), let lo = hexValue(bytes[i + 2]) {
                return .char(hi << 4 | lo, width: 3, form: .percentEncoded)
            }
            return .char(b, width: 1, form: .raw)
        }
        if b == 0x5C {  // backslash
            guard i + 1 < count else { return final ? .char(b, width: 1, form: .raw) : .needMore }
            guard bytes[i + 1] == 0x75 else { return .char(b, width: 1, form: .raw) }  // \u
            guard i + 5 < count else { return final ? .char(b, width: 1, form: .raw) : .needMore }
            var value: UInt32 = 0
            for k in 2...5 {
                guard let h = hexValue(bytes[i + k]) else { return .char(b, width: 1, form: .raw) }
                value = value << 4 | UInt32(h)
            }
            if value < 0x80 { return .char(UInt8(value), width: 6, form: .jsonEscaped) }
            return .char(b, width: 1, form: .raw)
        }
        return .char(b, width: 1, form: .raw)
    }

    /// Whether the escape cut off at `i` (`%X`, `\u`, `\u0`, …) can no longer decode to
    /// `want`, judged from the digits that have arrived. The filters rule such a candidate
    /// out from the same bytes, so `match` must too: what is decided before more bytes
    /// arrive must not depend on how the input was split.
    @inline(__always)
    static func partialEscapeRulesOut(_ bytes: UnsafeRawBufferPointer, _ i: Int, want: UInt8) -> Bool {
        let count = bytes.count
        guard i < count else { return false }
        if bytes[i] == 0x25 {
            guard want != 0x25, i + 1 < count, let high = hexValue(bytes[i + 1]) else { return false }
            return high != want >> 4
        }
        guard bytes[i] == 0x5C, want != 0x5C, i + 1 < count, bytes[i + 1] == 0x75 else { return false }
        let expected: [UInt8] = [0, 0, want >> 4, want & 0x0F]
        var k = 2
        while k <= 5, i + k < count {
            guard let digit = hexValue(bytes[i + k]) else { return false }  // not an escape: read raw
            if digit != expected[k - 2] { return true }
            k += 1
        }
        return false
    }

    /// Tries every placeholder at `start`. `previous` is the byte before `start` (nil at the
    /// start of a site). `final` says no more bytes will follow the buffer.
    func match(_ bytes: UnsafeRawBufferPointer, at start: Int, previous: UInt8?, final: Bool) -> Result {
        let first: UInt8
        let firstWidth: Int
        let firstForm: PlaceholderForm
        switch Self.decode(bytes, start, final: final) {
        case .needMore:
            // An escape cut off: undecided only while some placeholder may still start here.
            let open = entries.contains { entry in
                !(entry.checkBefore && previous.map(Self.isTokenByte) == true)
                    && !Self.partialEscapeRulesOut(bytes, start, want: entry.bytes[0])
            }
            return open ? .needMore : .none
        case .end: return .none
        case .char(let c, let width, let form):
            first = c
            firstWidth = width
            firstForm = form
        }
        var needMore = false
        var best: Result = .none
        var bestLength = 0
        for entry in entries where entry.bytes[0] == first {
            if entry.checkBefore, let previous, Self.isTokenByte(previous) { continue }
            var position = start + firstWidth
            var form = firstForm
            var matched = true
            var k = 1
            while k < entry.bytes.count {
                switch Self.decode(bytes, position, final: final) {
                case .needMore:
                    if !Self.partialEscapeRulesOut(bytes, position, want: entry.bytes[k]) { needMore = true }
                    matched = false
                case .end:
                    matched = false
                case .char(let c, let width, let charForm):
                    if c != entry.bytes[k] {
                        matched = false
                    } else {
                        position += width
                        if charForm == .jsonEscaped || (charForm == .percentEncoded && form == .raw) { form = charForm }
                    }
                }
                if !matched { break }
                k += 1
            }
            guard matched else { continue }
            if entry.checkAfter {
                switch Self.decode(bytes, position, final: final) {
                case .needMore:
                    needMore = true
                    continue
                case .end:
                    break
                case .char(let c, _, _):
                    if Self.isTokenByte(c) { continue }
                }
            }
            let length = position - start
            if length > bestLength {
                best = .match(secret: entry.secret, form: form, length: length)
                bestLength = length
            }
        }
        if case .match = best { return best }
        return needMore ? .needMore : .none
    }
}

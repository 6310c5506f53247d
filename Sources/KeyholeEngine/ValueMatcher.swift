/// Finds real secret values in what an upstream sends back, in every form an echo can
/// carry them:
/// - raw, percent-encoded (`%XX`, either hex case), and JSON-escaped (`\uXXXX` and the short
///   escapes `\/ \" \\ \b \f \n \r \t`), any subset of the characters escaped;
/// - base64, standard or URL-safe, at any alignment (so also inside `user:value`).
///
/// Unlike placeholders, values are found anywhere, with no token boundary: a value inside
/// a longer run is still the value.
///
/// Base64 is matched from the first character that carries any bit of the value to the
/// last that does, so every bit of the value is replaced.
final class ValueMatcher: StreamMatcher {
    /// One base64 encoding of a value: per character, which of its six bits the value
    /// fixes and to what.
    struct Base64Pattern: Sendable {
        let secret: Int
        let alignment: Int
        let masks: [UInt8]
        let bits: [UInt8]
    }

    let values: [[UInt8]]
    let patterns: [Base64Pattern]
    /// The hot path's view of the same (no per-candidate reference counting): values with
    /// the bytes that can start them, patterns' masks and bits concatenated.
    let valueFirsts: [UInt8]
    let valueHasEscape: [Bool]
    let patternFirst: [ByteSet]
    let patternMasks: [UInt8]
    let patternBits: [UInt8]
    let patternStarts: [Int]
    let patternSecrets: [Int]
    /// Any byte a value or a pattern can start with (a quick first test in `match`).
    let firstBytes: ByteSet
    /// Candidates by their first two bytes (SIMD).
    let pairClasses: PairClassScanner
    let lookahead: Int

    /// `values[i]` belongs to secret `i`; empty values are never matched.
    init(values: [[UInt8]]) {
        self.values = values
        var patterns: [Base64Pattern] = []
        var longest = 1
        for (secret, value) in values.enumerated() where !value.isEmpty {
            longest = max(longest, value.count)
            guard value.count >= 4 else { continue }
            for alignment in 0..<3 { patterns.append(Self.base64Pattern(value, alignment: alignment, secret: secret)) }
        }
        func chars(_ pattern: Base64Pattern, _ j: Int) -> [UInt8] {
            guard j < pattern.masks.count else { return (0...255).map(UInt8.init) }
            return Self.alphabet.filter { Self.decodeTable[Int($0)] & pattern.masks[j] == pattern.bits[j] }
        }
        var firstBytes = ByteSet()
        firstBytes.insert(0x25)
        firstBytes.insert(0x5C)
        valueFirsts = values.map { $0.first ?? 0 }
        valueHasEscape = values.map { $0.contains(0x25) || $0.contains(0x5C) }
        for value in values where !value.isEmpty { firstBytes.insert(value[0]) }
        var patternFirst: [ByteSet] = []
        var masks: [UInt8] = []
        var bits: [UInt8] = []
        var patternStarts: [Int] = [0]
        for pattern in patterns {
            var set = ByteSet()
            for char in chars(pattern, 0) {
                set.insert(char)
                firstBytes.insert(char)
            }
            patternFirst.append(set)
            masks += pattern.masks
            bits += pattern.bits
            patternStarts.append(masks.count)
        }
        self.patternFirst = patternFirst
        self.patternMasks = masks
        self.patternBits = bits
        self.patternStarts = patternStarts
        self.patternSecrets = patterns.map(\.secret)
        self.firstBytes = firstBytes
        self.patterns = patterns
        // Two-byte buckets: each value raw (then its second byte, or an escape), as `%XX`
        // (`%` then the high digit, either case), as a `\` escape (`\u`, or the short
        // escape of its first character); each base64 pattern's first two characters (for
        // a character that carries only two bits of the value, the next one is fully the
        // value's, so plain text does not stop at every fourth letter).
        let hex = Array("0123456789ABCDEFabcdef".utf8)
        var buckets: [(first: [UInt8], second: [UInt8])] = []
        for value in values where !value.isEmpty {
            let v0 = value[0]
            buckets.append(([v0], value.count > 1 ? [value[1], 0x25, 0x5C] : (0...255).map(UInt8.init)))
            let high = Int(v0 >> 4)
            buckets.append(([0x25], high < 10 ? [hex[high]] : [hex[high], hex[high + 6]]))
            buckets.append(([0x5C], [0x75] + Array("/\"\\bfnrt".utf8).filter { Self.shortEscape($0) == v0 }))
        }
        for pattern in patterns { buckets.append((chars(pattern, 0), chars(pattern, 1))) }
        self.pairClasses = PairClassScanner(buckets)
        // The longest value fully JSON-escaped; base64 is shorter.
        self.lookahead = 6 * longest + 8
        self.isEmpty = values.allSatisfy { $0.isEmpty }
    }

    /// No value to look for (decided once: `activate` asks at every substitution).
    let isEmpty: Bool

    func nextPlausibleCandidate(in bytes: UnsafeRawBufferPointer, from: Int, previous: UInt8?) -> Int? {
        var i = from
        // Candidates the full match rules out are skipped here, in one loop: a stream of
        // candidate bytes costs a match attempt each, not a round trip through the scanner.
        while let c = pairClasses.firstIndex(in: bytes, from: i) {
            if case .none = match(bytes, at: c, previous: nil, final: false) {
                i = c + 1
                continue
            }
            return c
        }
        return nil
    }

    func match(_ bytes: UnsafeRawBufferPointer, at start: Int, previous: UInt8?, final: Bool) -> PlaceholderMatcher.Result {
        let x = bytes[start]
        guard firstBytes.contains(x) else { return .none }
        var needMore = false
        var best: PlaceholderMatcher.Result = .none
        var bestLength = 0
        if x == 0x25 || x == 0x5C || valueFirsts.contains(x) {
            for secret in values.indices where !values[secret].isEmpty {
                guard x == valueFirsts[secret] || x == 0x25 || x == 0x5C else { continue }
                let result =
                    valueHasEscape[secret]
                    ? Self.matchValue(values[secret], bytes, start, final: final)
                    : Self.matchSinglePath(values[secret], bytes, start, final: final)
                switch result {
                case .needMore: needMore = true
                case .none: break
                case .match(_, let form, let length):
                    if length > bestLength {
                        best = .match(secret: secret, form: form, length: length)
                        bestLength = length
                    }
                }
            }
        }
        patternMasks.withUnsafeBufferPointer { masks in
            patternBits.withUnsafeBufferPointer { bits in
                for k in patternFirst.indices where patternFirst[k].contains(x) {
                    let from = patternStarts[k]
                    let length = patternStarts[k + 1] - from
                    var j = 1
                    var fits = true
                    while j < length {
                        guard start + j < bytes.count else {
                            if !final { needMore = true }
                            fits = false
                            break
                        }
                        let six = Self.decodeTable[Int(bytes[start + j])]
                        guard six != 0xFF, six & masks[from + j] == bits[from + j] else {
                            fits = false
                            break
                        }
                        j += 1
                    }
                    if fits, length > bestLength {
                        best = .match(secret: patternSecrets[k], form: .base64, length: length)
                        bestLength = length
                    }
                }
            }
        }
        if case .match = best { return best }
        return needMore ? .needMore : .none
    }

    // MARK: raw, percent, JSON

    /// Walks every reading of the input at once (a `%` may be itself or start `%XX`), so a
    /// value with `%` or `\` in it costs at most its length times the readings, never more.
    static func matchValue(_ value: [UInt8], _ b: UnsafeRawBufferPointer, _ start: Int, final: Bool) -> PlaceholderMatcher.Result {
        let count = b.count
        // Fast path: the first byte rules most candidates out.
        let first = b[start]
        if first != value[0], first != 0x25, first != 0x5C { return .none }
        // A value with no `%` or `\` in it has one reading at each position: walk it.
        if !value.contains(0x25), !value.contains(0x5C) { return matchSinglePath(value, b, start, final: final) }
        // (position, form rank: 0 raw, 1 percent, 2 JSON)
        var states: [(Int, UInt8)] = [(start, 0)]
        var next: [(Int, UInt8)] = []
        var needMore = false
        func add(_ position: Int, _ form: UInt8) {
            if let k = next.firstIndex(where: { $0.0 == position }) {
                next[k].1 = max(next[k].1, form)
            } else {
                next.append((position, form))
            }
        }
        for want in value {
            next.removeAll(keepingCapacity: true)
            for (i, form) in states {
                guard i < count else {
                    if !final { needMore = true }
                    continue
                }
                let x = b[i]
                if x == want { add(i + 1, form) }
                if x == 0x25 {  // %XX
                    if i + 2 < count {
                        if let hi = PlaceholderMatcher.hexValue(b[i + 1]), let lo = PlaceholderMatcher.hexValue(b[i + 2]), hi << 4 | lo == want {
                            add(i + 3, max(form, 1))
                        }
                    } else if !final, i + 1 == count || PlaceholderMatcher.hexValue(b[i + 1]) == want >> 4 {
                        needMore = true
                    }
                } else if x == 0x5C {  // \uXXXX, \/ and friends
                    guard i + 1 < count else {
                        if !final { needMore = true }
                        continue
                    }
                    let y = b[i + 1]
                    if y == 0x75 {
                        if i + 5 < count {
                            var code = 0
                            var ok = true
                            for k in 2...5 {
                                guard let h = PlaceholderMatcher.hexValue(b[i + k]) else {
                                    ok = false
                                    break
                                }
                                code = code << 4 | Int(h)
                            }
                            if ok, code == Int(want) { add(i + 6, 2) }
                        } else if !final {
                            needMore = true
                        }
                    } else if let short = shortEscape(y), short == want {
                        add(i + 2, 2)
                    }
                }
            }
            if next.isEmpty { return needMore ? .needMore : .none }
            swap(&states, &next)
        }
        // The longest reading (it covers the most input).
        let (end, rank) = states.max { $0.0 < $1.0 }!
        let form: PlaceholderForm = rank == 2 ? .jsonEscaped : rank == 1 ? .percentEncoded : .raw
        return .match(secret: 0, form: form, length: end - start)
    }

    /// `matchValue` for a value without `%` or `\`: a raw byte that equals the wanted one
    /// is that byte (it cannot start an escape), so there is never more than one reading.
    static func matchSinglePath(_ value: [UInt8], _ b: UnsafeRawBufferPointer, _ start: Int, final: Bool) -> PlaceholderMatcher.Result {
        let count = b.count
        var i = start
        var rank: UInt8 = 0
        for want in value {
            guard i < count else { return final ? .none : .needMore }
            let x = b[i]
            if x == want {
                i += 1
                continue
            }
            if x == 0x25 {  // %XX
                guard i + 2 < count else {
                    // Cut off: still open only while the digit that arrived fits (as the
                    // two-byte filter judges it).
                    if final { return .none }
                    if i + 1 < count, PlaceholderMatcher.hexValue(b[i + 1]) != want >> 4 { return .none }
                    return .needMore
                }
                guard let hi = PlaceholderMatcher.hexValue(b[i + 1]), let lo = PlaceholderMatcher.hexValue(b[i + 2]), hi << 4 | lo == want else {
                    return .none
                }
                i += 3
                rank = max(rank, 1)
                continue
            }
            guard x == 0x5C, i + 1 < count || !final else { return .none }
            guard i + 1 < count else { return .needMore }
            let y = b[i + 1]
            if y == 0x75 {  // \uXXXX
                guard i + 5 < count else { return final ? .none : .needMore }
                var code = 0
                for k in 2...5 {
                    guard let h = PlaceholderMatcher.hexValue(b[i + k]) else { return .none }
                    code = code << 4 | Int(h)
                }
                guard code == Int(want) else { return .none }
                i += 6
            } else {
                guard let short = shortEscape(y), short == want else { return .none }
                i += 2
            }
            rank = 2
        }
        let form: PlaceholderForm = rank == 2 ? .jsonEscaped : rank == 1 ? .percentEncoded : .raw
        return .match(secret: 0, form: form, length: i - start)
    }

    @inline(__always)
    static func shortEscape(_ y: UInt8) -> UInt8? {
        switch y {
        case 0x2F, 0x22, 0x5C: return y  // / " \
        case 0x62: return 0x08  // b
        case 0x66: return 0x0C  // f
        case 0x6E: return 0x0A  // n
        case 0x72: return 0x0D  // r
        case 0x74: return 0x09  // t
        default: return nil
        }
    }

    // MARK: base64

    static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_".utf8)
    static let standard = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    static let urlSafe = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)
    /// Character → six bits (both alphabets); 0xFF for anything else.
    static let decodeTable: [UInt8] = {
        var table = [UInt8](repeating: 0xFF, count: 256)
        for (i, c) in standard.enumerated() { table[Int(c)] = UInt8(i) }
        table[Int(UInt8(ascii: "-"))] = 62
        table[Int(UInt8(ascii: "_"))] = 63
        return table
    }()

    /// `value` after `alignment` unknown bytes: the characters that carry its bits.
    static func base64Pattern(_ value: [UInt8], alignment: Int, secret: Int) -> Base64Pattern {
        let (masks, bits) = sixBitGroups(value, alignment: alignment)
        var first = 0
        while first < masks.count, masks[first] == 0 { first += 1 }
        return Base64Pattern(secret: secret, alignment: alignment, masks: Array(masks[first...]), bits: Array(bits[first...]))
    }

    /// Per six-bit group of `alignment` unknown bytes followed by `value`: known bits, values.
    static func sixBitGroups(_ value: [UInt8], alignment: Int) -> (masks: [UInt8], bits: [UInt8]) {
        let start = 8 * alignment
        let end = start + 8 * value.count
        let groups = (end + 5) / 6
        var masks = [UInt8](repeating: 0, count: groups)
        var bits = [UInt8](repeating: 0, count: groups)
        for q in start..<end {
            let bit = (value[(q - start) / 8] >> (7 - UInt8((q - start) % 8))) & 1
            let shift = UInt8(5 - q % 6)
            masks[q / 6] |= 1 << shift
            bits[q / 6] |= bit << shift
        }
        return (masks, bits)
    }

    static func matchBase64(_ pattern: Base64Pattern, _ b: UnsafeRawBufferPointer, _ start: Int, final: Bool) -> PlaceholderMatcher.Result {
        let count = b.count
        for j in 0..<pattern.masks.count {
            guard start + j < count else { return final ? .none : .needMore }
            let six = decodeTable[Int(b[start + j])]
            guard six != 0xFF, six & pattern.masks[j] == pattern.bits[j] else { return .none }
        }
        return .match(secret: pattern.secret, form: .base64, length: pattern.masks.count)
    }

    /// The same characters with the value's bits replaced by those of `filler` (as long as
    /// the value), in the alphabet the original used; other bits are kept.
    func maskBase64(_ matched: [UInt8], secret: Int, filler: [UInt8]) -> [UInt8] {
        let value = values[secret]
        for pattern in patterns where pattern.secret == secret && pattern.masks.count == matched.count {
            var fits = true
            for j in 0..<matched.count {
                let six = Self.decodeTable[Int(matched[j])]
                if six == 0xFF || six & pattern.masks[j] != pattern.bits[j] {
                    fits = false
                    break
                }
            }
            guard fits else { continue }
            let groups = Self.sixBitGroups(Self.fit(filler, to: value.count), alignment: pattern.alignment).bits
            let offset = groups.count - pattern.masks.count
            let url = matched.contains { $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_") }
            let alphabet = url ? Self.urlSafe : Self.standard
            return matched.indices.map { j in
                let six = Self.decodeTable[Int(matched[j])]
                return alphabet[Int((six & ~pattern.masks[j]) | groups[offset + j])]
            }
        }
        return [UInt8](repeating: UInt8(ascii: "A"), count: matched.count)  // unreachable: a match fits its pattern
    }

    /// `bytes` cut or padded with `*` to `length`.
    static func fit(_ bytes: [UInt8], to length: Int) -> [UInt8] {
        bytes.count >= length ? Array(bytes.prefix(length)) : bytes + [UInt8](repeating: UInt8(ascii: "*"), count: length - bytes.count)
    }
}

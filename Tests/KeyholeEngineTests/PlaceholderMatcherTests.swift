@testable import KeyholeEngine
import Testing

@Suite("Placeholder matcher")
struct PlaceholderMatcherTests {
    let matcher = PlaceholderMatcher(placeholders: [Array("$MSB_TOKEN".utf8), Array("KH_KEY".utf8)])

    func match(_ text: String, final: Bool = true, previous: UInt8? = nil) -> PlaceholderMatcher.Result {
        Array(text.utf8).withUnsafeBytes { matcher.match($0, at: 0, previous: previous, final: final) }
    }

    @Test func forms() {
        #expect(match("$MSB_TOKEN") == .match(secret: 0, form: .raw, length: 10))
        #expect(match("%24MSB_TOKEN") == .match(secret: 0, form: .percentEncoded, length: 12))
        #expect(match("%24%4d%53%42_TOKEN") == .match(secret: 0, form: .percentEncoded, length: 18))
        #expect(match("\\u0024MSB_TOKEN") == .match(secret: 0, form: .jsonEscaped, length: 15))
        #expect(match("$MSB_TOKEN!") == .match(secret: 0, form: .raw, length: 10))
        #expect(match("$MSB_TOKEN%20") == .match(secret: 0, form: .raw, length: 10))
    }

    @Test func boundaries() {
        #expect(match("$MSB_TOKENS") == PlaceholderMatcher.Result.none)
        #expect(match("$MSB_TOKEN%41") == PlaceholderMatcher.Result.none, "percent-encoded token char continues the token")
        #expect(match("KH_KEY", previous: UInt8(ascii: "X")) == PlaceholderMatcher.Result.none)
        #expect(match("KH_KEY", previous: UInt8(ascii: "=")) == .match(secret: 1, form: .raw, length: 6))
        #expect(match("$MSB_TOKEN", previous: UInt8(ascii: "a")) == .match(secret: 0, form: .raw, length: 10))
    }

    @Test func needsMoreOnlyWhileStillPossible() {
        #expect(match("$MSB_TOK", final: false) == .needMore)
        #expect(match("$MSB_TOKEN", final: false) == .needMore, "the next byte decides the token boundary")
        #expect(match("$MSB_X", final: false) == PlaceholderMatcher.Result.none)
        #expect(match("%2", final: false) == .needMore)
        #expect(match("%zz", final: false) == PlaceholderMatcher.Result.none)
        #expect(match("$MSB_TOK", final: true) == PlaceholderMatcher.Result.none)
    }

    @Test func scannerFindsEveryCandidateByte() {
        let text = Array((String(repeating: "a", count: 200) + "%" + String(repeating: "b", count: 100) + "K").utf8)
        text.withUnsafeBytes { bytes in
            #expect(matcher.nextCandidate(in: bytes, from: 0) == 200)
            #expect(matcher.nextCandidate(in: bytes, from: 201) == 301)
            #expect(matcher.nextCandidate(in: bytes, from: 302) == nil)
        }
    }
}

/// The quick rejection that keeps candidate-dense input fast never rejects a placeholder:
/// wherever it says "certainly none", the full match agrees (random inputs over an alphabet
/// of placeholder pieces, escapes and candidate bytes; fixed seed).
@Suite("Placeholder matcher quick rejection")
struct PlaceholderQuickRejectionTests {
    @Test func neverRejectsWhatTheFullMatchFinds() {
        let matcher = PlaceholderMatcher(placeholders: [Array("$MSB_TOKEN".utf8), Array("PH_KEY".utf8), Array("{{vault}}".utf8)])
        let pieces = ["$", "%", "\\", "u", "0", "2", "4", "M", "S", "B", "_", "T", "O", "K", "E", "N", "P", "H", "Y", "{", "v", "a", "}",
                      "%24", "%4D", "%4d", "\\u0024", "\\u004D", "$MSB_TOKEN", "PH_KEY", "{{vault}}", "x", "="]
        var random = SplitMix(seed: 42)
        var checked = 0
        var rejected = 0
        for _ in 0..<20_000 {
            var text = ""
            for _ in 0..<Int.random(in: 1...12, using: &random) { text += pieces.randomElement(using: &random)! }
            let bytes = Array(text.utf8)
            let previous: UInt8? = Bool.random(using: &random) ? nil : UInt8(ascii: Bool.random(using: &random) ? "a" : "=")
            bytes.withUnsafeBytes { b in
                for c in b.indices {
                    let before = c > 0 ? b[c - 1] : previous
                    guard matcher.certainlyNone(b, at: c, previous: before) else { continue }
                    rejected += 1
                    for final in [true, false] {
                        let full = matcher.match(b, at: c, previous: before, final: final)
                        #expect(full != .needMore || !final)
                        if case .match = full { Issue.record("rejected a placeholder at \(c) in \(text)") }
                    }
                    checked += 1
                }
            }
        }
        #expect(rejected > 5_000, "the test exercised the rejection (\(rejected) of \(checked))")
    }

    /// The pair scan (SIMD, with its scalar window and its third-byte check) skips no match:
    /// walking a buffer candidate by candidate finds exactly what trying every index finds.
    @Test func thePairScanSkipsNoMatch() {
        let matcher = PlaceholderMatcher(placeholders: [Array("$MSB_TOKEN".utf8), Array("PH_KEY".utf8), Array("{{vault}}".utf8)])
        #expect(matcher.pairScanner != nil)
        let pieces = ["$", "%", "\\", "u", "0", "2", "4", "M", "S", "P", "H", "_", "{", "x", "%24", "%50", "%7b", "\\u0024", "$MSB_TOKEN", "PH_KEY",
                      "{{vault}}", String(repeating: "a", count: 40), String(repeating: "$M", count: 20)]
        var random = SplitMix(seed: 7)
        for _ in 0..<3000 {
            var text = ""
            for _ in 0..<Int.random(in: 1...30, using: &random) { text += pieces.randomElement(using: &random)! }
            let bytes = Array(text.utf8)
            bytes.withUnsafeBytes { b in
                var naive: [Int] = []
                for c in b.indices {
                    if case .match = matcher.match(b, at: c, previous: c > 0 ? b[c - 1] : nil, final: true) { naive.append(c) }
                }
                var walked: [Int] = []
                var i = 0
                while let c = matcher.nextPlausibleCandidate(in: b, from: i, previous: nil) {
                    if case .match = matcher.match(b, at: c, previous: c > 0 ? b[c - 1] : nil, final: true) { walked.append(c) }
                    i = c + 1
                }
                #expect(walked == naive, "\(text)")
            }
        }
    }
}

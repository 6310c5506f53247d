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

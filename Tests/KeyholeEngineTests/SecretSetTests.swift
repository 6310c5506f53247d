import KeyholeEngine
import KeyholePolicy
import NIOCore
import Testing

/// The proxy compiles a policy's secrets once and its connections share them: whatever one
/// connection does must not show in another's bytes or decisions.
@Suite("Shared compiled secrets")
struct SecretSetTests {
    static let secrets = [
        secret("TOKEN", value: "real-token-value"),
        secret("KEY", value: "a b&c/=", hosts: ["api.example.com", "other.example.com"], inject: Injection(query: true)),
    ]

    /// Feeds each stream to its consumer one byte at a time, taking turns, and returns what
    /// each produced.
    static func interleaved(_ streams: [[UInt8]], feed: (Int, ByteBuffer) -> Void) {
        for offset in 0..<(streams.map(\.count).max() ?? 0) {
            for (index, stream) in streams.enumerated() where offset < stream.count {
                feed(index, ByteBuffer(bytes: stream[offset..<(offset + 1)]))
            }
        }
    }

    @Test func rewritersSharingASetTakeTheirOwnDecisionsOverInterleavedBytes() {
        let shared = SecretSet(Self.secrets)
        let allowed = ConnectionIdentity.verifiedTLS(sni: "api.example.com")
        let other = ConnectionIdentity.verifiedTLS(sni: "other.example.com")
        let requests = [
            (allowed, "GET /a?k=$MSB_KEY HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer $MSB_TOKEN\r\n\r\n"),
            // TOKEN may not go to other.example.com: this connection is blocked ...
            (other, "GET /b HTTP/1.1\r\nHost: other.example.com\r\nAuthorization: Bearer $MSB_TOKEN\r\n\r\n"),
            // ... while this one, on the same set, gets KEY there.
            (other, "GET /c?k=$MSB_KEY HTTP/1.1\r\nHost: other.example.com\r\n\r\n"),
        ]
        let rewriters = requests.map { RequestRewriter(identity: $0.0, secrets: shared) }
        var outputs = Array(repeating: RewriteOutput(), count: requests.count)
        Self.interleaved(requests.map { Array($0.1.utf8) }) { index, piece in
            rewriters[index].consume(piece, into: &outputs[index])
        }
        for (index, request) in requests.enumerated() {
            rewriters[index].finish(into: &outputs[index])
            let alone = rewrite(request.1, secrets: Self.secrets, identity: request.0)
            let bytes = outputs[index].upstream.flatMap { Array($0.readableBytesView) }
            #expect(bytes == alone.bytes, "request \(index)")
            #expect(rewriters[index].status == alone.status, "request \(index)")
        }
        #expect(rewriters.map(\.status) == [.open, .blocked, .open])
        let first = String(decoding: outputs[0].upstream.flatMap { Array($0.readableBytesView) }, as: UTF8.self)
        #expect(first.contains("?k=a%20b%26c%2F%3D") && first.contains("Bearer real-token-value"))
    }

    @Test func maskersSharingASetMaskEachResponseOverInterleavedBytes() {
        let shared = SecretSet(Self.secrets)
        let bodies = [
            "token real-token-value and key a%20b%26c%2F%3D",
            "nothing to see here, just bytes of no interest at all",
            "cmVhbC10b2tlbi12YWx1ZQ== then \\u0072eal-token-value",
        ]
        let responses = bodies.map { "HTTP/1.1 200 OK\r\nContent-Length: \($0.utf8.count)\r\n\r\n\($0)" }
        let maskers = responses.map { _ in ResponseMasker(secrets: shared, masking: true) }
        for masker in maskers { masker.expect(ExpectedResponse()) }
        var outputs = Array(repeating: MaskOutput(), count: responses.count)
        Self.interleaved(responses.map { Array($0.utf8) }) { index, piece in
            maskers[index].consume(piece, into: &outputs[index])
        }
        for (index, response) in responses.enumerated() {
            maskers[index].finish(into: &outputs[index])
            let alone = ResponseMasker(secrets: Self.secrets, masking: true)
            alone.expect(ExpectedResponse())
            var expected = MaskOutput()
            alone.consume(ByteBuffer(string: response), into: &expected)
            alone.finish(into: &expected)
            let bytes = outputs[index].guest.flatMap { Array($0.readableBytesView) }
            #expect(bytes == expected.guest.flatMap { Array($0.readableBytesView) }, "response \(index)")
            let text = String(decoding: bytes, as: UTF8.self)
            #expect(!text.contains("real-token-value") && !text.contains("a%20b%26c"), "response \(index): \(text)")
        }
        #expect(outputs.map(\.events.count) == [2, 0, 2])
    }
}

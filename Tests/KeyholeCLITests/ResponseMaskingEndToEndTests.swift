import Foundation
import Testing

/// An allowed upstream that reflects what it received (echo endpoints, error messages,
/// redirects, base64 of Basic credentials, compressed echoes): the guest, a real curl in a
/// namespace, never gets the real value back. Root only; CI runs as root.
@Suite("Response masking end to end", .serialized, .enabled(if: isRoot, "needs root for network namespaces"))
struct ResponseMaskingEndToEndTests {
    static let realValue = "e2e-real-token-0001"

    static let policy = """
        version: 1
        name: masking
        secrets:
          - env: TOKEN
            value: "\(realValue)"
            allow_hosts: [api.example.test]
            inject: { headers: true, basic_auth: true, query: true, body: true }
        network:
          on_secret_violation: block-and-log
          upstream_ca: [{{DIR}}/upca.pem]
        """

    /// Every way the guest could read the value back out of a response.
    static func leaks(_ text: String) -> Bool {
        let forms = [
            realValue, realValue.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!,
            Data(("user:" + realValue).utf8).base64EncodedString(),
        ]
        return forms.contains { text.contains($0) }
    }

    @Test func aReflectingUpstreamNeverHandsTheValueBack() throws {
        let harness = try ProxyHarness()
        defer { harness.close() }
        let log = try harness.upstream("203.0.113.10", port: 443, cert: "api.example.test", extra: ["--reflect"])
        try harness.startProxy(policy: Self.policy)
        let bearer = "-H 'Authorization: Bearer $MSB_TOKEN'"

        // A header quoting the token (a 401's WWW-Authenticate).
        let header = try harness.curl("https://api.example.test/reflect/header", "-D - -o /dev/null \(bearer)")
        #expect(header.status == 0, "\(header.stderr)")
        #expect(header.stdout.contains("token=\"$MSB_TOKEN\""), "\(header.stdout)")
        // httpbin-style JSON echo (Content-Length body).
        let body = try harness.curl("https://api.example.test/reflect/body", bearer)
        #expect(body.stdout.contains("\"Authorization\": \"Bearer $MSB_TOKEN"), "\(body.stdout)")
        // A JSON error with the token \u-escaped; a form body with it percent-encoded.
        let json = try harness.curl("https://api.example.test/reflect/json", bearer)
        #expect(json.status == 0 && json.stdout.hasPrefix("{\"error\":\"bad token"), "\(json.stdout)")
        let percent = try harness.curl("https://api.example.test/reflect/percent", bearer)
        #expect(percent.stdout.hasPrefix("token=$MSB_TOKEN"), "\(percent.stdout)")
        // base64: of Basic credentials (standard) and of a prefixed value (URL-safe).
        let base64 = try harness.curl("https://api.example.test/reflect/base64", "-u 'ci:$MSB_TOKEN'")
        let fields = (try? JSONSerialization.jsonObject(with: Data(base64.stdout.utf8)) as? [String: String]) ?? [:]
        let basic = String(decoding: Data(base64Encoded: fields["basic"] ?? "") ?? Data(), as: UTF8.self)
        #expect(basic.hasPrefix("user:$MSB_TOKEN"), "\(base64.stdout)")
        let url = (fields["url"] ?? "").replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        let urlDecoded = String(decoding: Data(base64Encoded: url) ?? Data(), as: UTF8.self)
        #expect(urlDecoded.contains("MSB_TOKEN") && !urlDecoded.contains("real-token"), "\(urlDecoded)")
        // A redirect whose Location carries the query.
        let redirect = try harness.curl("https://api.example.test/reflect/redirect?token=$MSB_TOKEN", "-D - -o /dev/null")
        #expect(redirect.stdout.contains("Location: https://login.example.test/cb?token=$MSB_TOKEN\r\n"), "\(redirect.stdout)")
        // Chunked, the value split across 3-byte chunks.
        let chunked = try harness.curl("https://api.example.test/reflect/chunked", bearer)
        #expect(chunked.status == 0 && chunked.stdout.hasPrefix("echo $MSB_TOKEN") && chunked.stdout.hasSuffix(" done"), "\(chunked.stdout)")
        // The guest asks for gzip; Keyhole asks the upstream for identity, so the echo is readable.
        let compressed = try harness.curl("https://api.example.test/reflect/gzip", "--compressed \(bearer)")
        #expect(compressed.status == 0 && compressed.stdout.contains("$MSB_TOKEN"), "\(compressed.stderr)")
        // An upstream that compresses anyway: decoded, masked, sent identity-encoded.
        let forced = try harness.curl("https://api.example.test/reflect/forced-gzip", "-D - \(bearer)")
        #expect(forced.status == 0 && forced.stdout.contains("{\"token\": \"$MSB_TOKEN"), "\(forced.stdout) \(forced.stderr)")
        #expect(!forced.stdout.lowercased().contains("content-encoding"))
        // A coding Keyhole cannot read: never forwarded, the connection is reset.
        let brotli = try harness.curl("https://api.example.test/reflect/brotli", bearer)
        #expect(brotli.status != 0 && brotli.stdout.isEmpty)
        // A response with no value arrives byte for byte.
        let binary = try harness.guest(
            "curl -sS --max-time 10 --cacert \(harness.stateDirectory)/ca.pem --resolve api.example.test:443:203.0.113.10 \(bearer) "
                + "https://api.example.test/reflect/binary | python3 -c \"import sys; d = sys.stdin.buffer.read(); "
                + "print(d == bytes(range(256)) * 64 + b'%24\\\\\\\\u0024\\$MSB')\"")
        #expect(binary.stdout == "True\n", "\(binary.stdout) \(binary.stderr)")

        for result in [header, body, json, percent, base64, redirect, chunked, compressed, forced, brotli, binary] {
            #expect(!Self.leaks(result.stdout), "the guest got the value back: \(result.stdout)")
        }
        // The upstream did get the value (so there was something to mask), and was asked
        // for identity responses.
        let records = harness.records(log)
        #expect(records.count == 11)
        #expect(records.allSatisfy { harness.header($0, "Accept-Encoding") == "identity" })
        #expect(harness.header(records[1], "Authorization") == "Bearer \(Self.realValue)")
        let audit = harness.audit
        #expect(audit.contains("\"event\":\"masked\""))
        #expect(audit.contains("\"event\":\"value-in-response\""))
        #expect(!audit.contains(Self.realValue) && !harness.stderr.contains(Self.realValue))
        let metrics = try harness.metricsText()
        #expect(metrics.contains("keyhole_maskings_total{"))
        #expect(metrics.contains("keyhole_response_bytes_scanned_total"))
        #expect(!metrics.contains(Self.realValue))
    }
}

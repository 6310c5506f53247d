import Benchmark
import Glibc
import KeyholeEngine
import KeyholePolicy
import NIOCore

// Figures these produce are recorded in bench/README.md. Throughput benchmarks report
// time per MiB scanned; compare `engine-scan-1MiB` with `memchr-1MiB` for the
// "placeholder-free bytes at ≥ 1/3 of memchr speed" target.

let secrets = [
    Secret(
        env: "GITHUB_TOKEN", value: SecretValue("ghp_0123456789abcdefghijklmnopqrstuvwxyzAB"),
        allowedHosts: HostAllowList(exact: ["api.github.com"]), inject: Injection(headers: true, basicAuth: true, query: false, body: true)),
    Secret(env: "OPENAI_API_KEY", value: SecretValue("sk-0123456789"), allowedHosts: HostAllowList(exact: ["api.openai.com"])),
]
let identity = ConnectionIdentity.verifiedTLS(sni: "api.github.com")

/// A typical ~1 KiB API request with the placeholder in Authorization.
let typicalRequest: ByteBuffer = {
    var text = "GET /repos/keyhole/keyhole/pulls?state=open&per_page=100&page=2 HTTP/1.1\r\n"
    text += "Host: api.github.com\r\n"
    text += "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) agent/1.4.2 python-requests/2.31.0\r\n"
    text += "Accept: application/vnd.github+json, application/json;q=0.9, text/plain;q=0.8, */*;q=0.5\r\n"
    text += "Accept-Encoding: gzip, deflate, br\r\n"
    text += "Accept-Language: en-US,en;q=0.9\r\n"
    text += "Authorization: Bearer $MSB_GITHUB_TOKEN\r\n"
    text += "X-GitHub-Api-Version: 2022-11-28\r\n"
    text += "X-Request-Id: 6f1c2a8e-3b4d-4e5f-9a0b-1c2d3e4f5a6b\r\n"
    text += "Cookie: _octo=GH1.1.123456789.1700000000; logged_in=no; preferred_color_mode=dark; tz=Europe%2FBerlin\r\n"
    text += "Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    text += "If-None-Match: W/\"b1946ac92492d2347c6235b4d2611184a2d9c8f7e6b5a4\"\r\n"
    text += "Cache-Control: no-cache\r\n"
    text += "Connection: keep-alive\r\n"
    while text.utf8.count < 1000 { text += "X-Padding: " + String(repeating: "p", count: min(60, 1000 - text.utf8.count)) + "\r\n" }
    text += "\r\n"
    return ByteBuffer(string: text)
}()

/// 1 MiB of text-like bytes with no placeholder and no candidate byte.
let cleanBody: [UInt8] = (0..<(1 << 20)).map { i in UInt8(ascii: "a") + UInt8(i % 26) }

func bodyRequest(_ body: [UInt8], chunked: Bool = false) -> ByteBuffer {
    var buffer = ByteBuffer()
    if chunked {
        buffer.writeString("POST /upload HTTP/1.1\r\nHost: api.github.com\r\nTransfer-Encoding: chunked\r\n\r\n")
        var offset = 0
        while offset < body.count {
            let n = min(16384, body.count - offset)
            buffer.writeString(String(n, radix: 16) + "\r\n")
            buffer.writeBytes(body[offset..<offset + n])
            buffer.writeString("\r\n")
            offset += n
        }
        buffer.writeString("0\r\n\r\n")
    } else {
        buffer.writeString("POST /upload HTTP/1.1\r\nHost: api.github.com\r\nContent-Length: \(body.count)\r\n\r\n")
        buffer.writeBytes(body)
    }
    return buffer
}

/// Feeds `input` in TLS-record-sized reads, as the proxy would.
@inline(__always)
func feed(_ input: ByteBuffer, _ rewriter: RequestRewriter, _ output: inout RewriteOutput, read: Int = 16384) {
    var rest = input
    while rest.readableBytes > 0 {
        rewriter.consume(rest.readSlice(length: min(read, rest.readableBytes))!, into: &output)
        output.upstream.removeAll(keepingCapacity: true)
        output.events.removeAll(keepingCapacity: true)
    }
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal], maxDuration: .seconds(2), maxIterations: 1_000_000)
    print("engine SIMD implementation: \(EngineSIMD.implementation)")

    Benchmark("rewrite-typical-1KiB-request", configuration: .init(scalingFactor: .kilo)) { benchmark in
        let rewriter = RequestRewriter(identity: identity, secrets: secrets)
        var output = RewriteOutput()
        output.upstream.reserveCapacity(8)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            rewriter.consume(typicalRequest, into: &output)
            blackHole(output.upstream.count)
            output.upstream.removeAll(keepingCapacity: true)
            output.events.removeAll(keepingCapacity: true)
        }
    }

    Benchmark("engine-scan-1MiB-streamed-body") { benchmark in
        let input = bodyRequest(cleanBody)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let rewriter = RequestRewriter(identity: identity, secrets: [secrets[1]])
            var output = RewriteOutput()
            feed(input, rewriter, &output, read: 1 << 20)
            blackHole(output.forwardedBytes)
        }
    }

    // Worst cases: a body made of nothing but one candidate byte (`%`, `$`, `\\`, and the
    // first letter of a custom placeholder), streamed with body substitution on. Target:
    // at least 1/4 of `engine-scan-1MiB-streamed-body` (ordinary bytes).
    for (name, byte) in [("percent", UInt8(ascii: "%")), ("dollar", UInt8(ascii: "$")), ("backslash", UInt8(ascii: "\\")), ("custom-first-letter", UInt8(ascii: "P"))] {
        Benchmark("engine-dense-1MiB-body-\(name)") { benchmark in
            let custom = Secret(
                env: "PH_TOKEN", placeholder: "PH_TOKEN", value: SecretValue("v"), allowedHosts: HostAllowList(exact: ["api.github.com"]),
                inject: Injection(body: true))
            let input = bodyRequest([UInt8](repeating: byte, count: 1 << 20), chunked: true)
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations {
                let rewriter = RequestRewriter(identity: identity, secrets: [secrets[0], custom])
                var output = RewriteOutput()
                feed(input, rewriter, &output)
                blackHole(output.forwardedBytes)
            }
        }
    }

    Benchmark("matcher-scan-1MiB-no-candidates") { benchmark in
        let matcher = PlaceholderMatcher(placeholders: secrets.map { Array($0.placeholder.utf8) })
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            cleanBody.withUnsafeBytes { blackHole(matcher.firstCandidate(in: $0)) }
        }
    }

    Benchmark("memchr-1MiB-baseline") { benchmark in
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            cleanBody.withUnsafeBytes { blackHole(memchr($0.baseAddress!, 0x24, $0.count)) }
        }
    }

    Benchmark("engine-held-1MiB-body-with-substitution") { benchmark in
        var body = cleanBody
        body.replaceSubrange(500_000..<500_018, with: Array("$MSB_GITHUB_TOKEN ".utf8))
        let input = bodyRequest(body)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let rewriter = RequestRewriter(identity: identity, secrets: secrets)
            var output = RewriteOutput()
            feed(input, rewriter, &output)
            blackHole(output.insertedBytes)
        }
    }

    Benchmark("engine-body-substitution-1MiB-every-4KiB") { benchmark in
        // A placeholder every 4 KiB: 256 substitutions in the held body.
        var body = cleanBody
        var offset = 2048
        while offset + 19 <= body.count {
            body.replaceSubrange(offset..<offset + 19, with: Array(" $MSB_GITHUB_TOKEN ".utf8))
            offset += 4096
        }
        let input = bodyRequest(body)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let rewriter = RequestRewriter(identity: identity, secrets: secrets)
            var output = RewriteOutput()
            feed(input, rewriter, &output)
            precondition(output.insertedBytes > 256 * 40)
            blackHole(output.insertedBytes)
        }
    }

    Benchmark("engine-chunked-1MiB-body-reframed") { benchmark in
        let input = bodyRequest(cleanBody, chunked: true)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let rewriter = RequestRewriter(identity: identity, secrets: secrets)
            var output = RewriteOutput()
            feed(input, rewriter, &output)
            blackHole(output.forwardedBytes)
        }
    }

    // Response masking (the upstream → guest direction): a 1 MiB Content-Length response
    // read in 16 KiB pieces, masking on for both secrets' values.
    func maskedResponse(_ body: [UInt8]) -> ByteBuffer {
        var buffer = ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: \(body.count)\r\n\r\n")
        buffer.writeBytes(body)
        return buffer
    }
    let value = Array("ghp_0123456789abcdefghijklmnopqrstuvwxyzAB".utf8)
    let reflecting: [UInt8] = {
        var body = cleanBody
        for at in stride(from: 1000, to: body.count - value.count, by: 4096) { body.replaceSubrange(at..<(at + value.count), with: value) }
        return body
    }()
    let base64Text: [UInt8] = (0..<(1 << 20)).map { i in Array("QWxhZGRpbjpvcGVuIHNlc2FtZQ+/".utf8)[(i * 7) % 28] }
    for (name, body) in [("no-value", cleanBody), ("value-every-4KiB", reflecting), ("base64-text", base64Text)] {
        Benchmark("mask-1MiB-response-\(name)") { benchmark in
            let input = maskedResponse(body)
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations {
                let masker = ResponseMasker(secrets: secrets, masking: true)
                masker.expect(ExpectedResponse())
                var output = MaskOutput()
                var rest = input
                while rest.readableBytes > 0 {
                    masker.consume(rest.readSlice(length: min(16384, rest.readableBytes))!, into: &output)
                    output.guest.removeAll(keepingCapacity: true)
                }
                blackHole(output.events.count)
            }
        }
    }
}

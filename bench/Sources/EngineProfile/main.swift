// A plain loop over one engine workload, for profilers (perf record, valgrind --tool=callgrind):
//   swift build -c release --product EngineProfile
//   valgrind --tool=callgrind .build/release/EngineProfile rewrite 100000
//   .build/release/EngineProfile dense 'BYTES' 256   # a chunked body of BYTES repeated, 256 MiB: prints MB/s
//   .build/release/EngineProfile mask 'BYTES' 256    # a 256 MiB response of BYTES repeated, masked: prints MB/s
import Foundation
import KeyholeEngine
import KeyholePolicy
import NIOCore

let secrets = [
    Secret(
        env: "GITHUB_TOKEN", value: SecretValue("ghp_0123456789abcdefghijklmnopqrstuvwxyzAB"),
        allowedHosts: HostAllowList(exact: ["api.github.com"]))
]
var text = "GET /repos/keyhole/keyhole/pulls?state=open&per_page=100&page=2 HTTP/1.1\r\nHost: api.github.com\r\n"
text += "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) agent/1.4.2\r\n"
text += "Accept: application/vnd.github+json\r\nAuthorization: Bearer $MSB_GITHUB_TOKEN\r\n"
while text.utf8.count < 1000 { text += "X-Padding: " + String(repeating: "p", count: min(60, 1000 - text.utf8.count)) + "\r\n" }
text += "\r\n"
if CommandLine.arguments.count > 1, CommandLine.arguments[1] == "dense" {
    let pattern = Array(CommandLine.arguments[2].utf8)
    let mebibytes = CommandLine.arguments.count > 3 ? Int(CommandLine.arguments[3])! : 256
    let custom = Secret(
        env: "PH_TOKEN", placeholder: "PH_TOKEN", value: SecretValue("v"), allowedHosts: HostAllowList(exact: ["api.github.com"]),
        inject: Injection(body: true))
    var bodySecrets = secrets
    bodySecrets[0].inject.body = true
    let rewriter = RequestRewriter(identity: .verifiedTLS(sni: "api.github.com"), secrets: bodySecrets + [custom])
    var output = RewriteOutput()
    rewriter.consume(ByteBuffer(string: "POST /u HTTP/1.1\r\nHost: api.github.com\r\nTransfer-Encoding: chunked\r\n\r\n"), into: &output)
    var chunk = ByteBuffer(string: "4000\r\n")
    for i in 0..<16384 { chunk.writeInteger(pattern[i % pattern.count]) }
    chunk.writeString("\r\n")
    let start = ContinuousClock.now
    for _ in 0..<(mebibytes * 64) {
        rewriter.consume(chunk, into: &output)
        output.upstream.removeAll(keepingCapacity: true)
        output.events.removeAll(keepingCapacity: true)
    }
    let seconds = Double((ContinuousClock.now - start).components.attoseconds) / 1e18 + Double((ContinuousClock.now - start).components.seconds)
    print("\(String(decoding: pattern, as: UTF8.self)): \(Int(Double(mebibytes) * 1.048576 / seconds)) MB/s")
    exit(0)
}
if CommandLine.arguments.count > 1, CommandLine.arguments[1] == "mask" {
    // Response masking: a Content-Length response of the pattern repeated, read in 16 KiB
    // pieces (a TLS record's worth), masking on for the secret's value.
    let pattern = Array(CommandLine.arguments[2].utf8)
    let mebibytes = CommandLine.arguments.count > 3 ? Int(CommandLine.arguments[3])! : 256
    let masker = ResponseMasker(secrets: secrets, masking: true)
    masker.expect(ExpectedResponse())
    var output = MaskOutput()
    masker.consume(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: \(mebibytes << 20)\r\n\r\n"), into: &output)
    var piece = ByteBuffer()
    for i in 0..<16384 { piece.writeInteger(pattern[i % pattern.count]) }
    var masked = 0
    let start = ContinuousClock.now
    for _ in 0..<(mebibytes * 64) {
        masker.consume(piece, into: &output)
        masked += output.events.count
        output.guest.removeAll(keepingCapacity: true)
        output.events.removeAll(keepingCapacity: true)
    }
    let elapsed = ContinuousClock.now - start
    let seconds = Double(elapsed.components.attoseconds) / 1e18 + Double(elapsed.components.seconds)
    print("mask \(String(decoding: pattern.prefix(40), as: UTF8.self)): \(Int(Double(mebibytes) * 1.048576 / seconds)) MB/s, \(masked) maskings")
    exit(0)
}
if CommandLine.arguments.count > 1, CommandLine.arguments[1] == "responses" {
    // Keep-alive: small responses, each paired with its request, masking on.
    let iterations = CommandLine.arguments.count > 2 ? Int(CommandLine.arguments[2])! : 1_000_000
    let masking = CommandLine.arguments.count > 3 ? CommandLine.arguments[3] != "off" : true
    let masker = ResponseMasker(secrets: secrets, masking: masking)
    let response = ByteBuffer(string: "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 29 Nov 2026 04:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")
    var output = MaskOutput()
    var total = 0
    let start = ContinuousClock.now
    for _ in 0..<iterations {
        masker.expect(ExpectedResponse())
        masker.consume(response, into: &output)
        total &+= output.guest.count
        output.guest.removeAll(keepingCapacity: true)
    }
    let elapsed = ContinuousClock.now - start
    let seconds = Double(elapsed.components.attoseconds) / 1e18 + Double(elapsed.components.seconds)
    print("responses: \(Int(seconds * 1e9 / Double(iterations))) ns each (masking \(masking)), \(total)")
    exit(0)
}
let request = ByteBuffer(string: text)
let iterations = CommandLine.arguments.count > 2 ? Int(CommandLine.arguments[2])! : 100_000
let rewriter = RequestRewriter(identity: .verifiedTLS(sni: "api.github.com"), secrets: secrets)
var output = RewriteOutput()
var total = 0
for _ in 0..<iterations {
    rewriter.consume(request, into: &output)
    total &+= output.upstream.count
    output.upstream.removeAll(keepingCapacity: true)
    output.events.removeAll(keepingCapacity: true)
}
print(total)

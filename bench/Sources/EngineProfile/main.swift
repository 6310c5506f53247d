// A plain loop over one engine workload, for profilers (perf record, valgrind --tool=callgrind):
//   swift build -c release --product EngineProfile
//   valgrind --tool=callgrind .build/release/EngineProfile rewrite 100000
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

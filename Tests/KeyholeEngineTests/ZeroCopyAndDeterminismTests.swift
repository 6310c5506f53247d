import KeyholeEngine
import KeyholePolicy
import NIOCore
import Testing

@Suite("Zero copy and split independence")
struct ZeroCopyAndDeterminismTests {
    /// True when every byte of `slice` lies inside `input`'s storage.
    func shares(_ slice: ByteBuffer, with input: ByteBuffer) -> Bool {
        input.withUnsafeReadableBytes { whole in
            slice.withUnsafeReadableBytes { part in
                guard let w = whole.baseAddress, let p = part.baseAddress else { return false }
                return p >= w && p + part.count <= w + whole.count
            }
        }
    }

    @Test func aStreamedMegabyteBodyIsForwardedWithoutCopying() {
        let body = [UInt8](repeating: UInt8(ascii: "x"), count: 1 << 20)
        let head = "PUT /blob HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer $MSB_TOKEN\r\nContent-Length: \(body.count)\r\n\r\n"
        let input = ByteBuffer(bytes: Array(head.utf8) + body)
        let rewriter = RequestRewriter(identity: .verifiedTLS(sni: "api.example.com"), secrets: [token])
        var output = RewriteOutput()
        rewriter.consume(input, into: &output)
        #expect(rewriter.status == .open)
        #expect(output.copiedInputBytes == 0)
        #expect(output.insertedBytes == "real-token-value".utf8.count)
        #expect(output.forwardedBytes == input.readableBytes - "$MSB_TOKEN".utf8.count)
        let inserted = output.upstream.filter { !shares($0, with: input) }
        #expect(inserted.map { String(buffer: $0) } == ["real-token-value"])
        #expect(output.upstream.count <= 4)
    }

    @Test func aHeldBodyWithSubstitutionsCopiesNoInputByte() {
        var body = [UInt8](repeating: UInt8(ascii: "y"), count: 256 * 1024)
        // Whole tokens: a space after each, or "yyy" would make them part of a longer token.
        body.replaceSubrange(1000..<1011, with: Array("$MSB_TOKEN ".utf8))
        body.replaceSubrange(200_000..<200_011, with: Array("$MSB_TOKEN ".utf8))
        let s = secret("TOKEN", value: "real-token-value", inject: Injection(body: true))
        let head = "POST /b HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: \(body.count)\r\n\r\n"
        let whole = ByteBuffer(bytes: Array(head.utf8) + body)
        let rewriter = RequestRewriter(identity: .verifiedTLS(sni: "api.example.com"), secrets: [s])
        var output = RewriteOutput()
        // Arrive in 16 KiB reads, as TLS records would deliver it.
        var rest = whole
        while rest.readableBytes > 0 {
            rewriter.consume(rest.readSlice(length: min(16384, rest.readableBytes))!, into: &output)
        }
        #expect(output.copiedInputBytes == 0)
        let newLength = String(body.count + 2 * 6)
        #expect(output.insertedBytes == 2 * 16 + newLength.utf8.count)
        for buffer in output.upstream where !shares(buffer, with: whole) {
            #expect(["real-token-value", newLength].contains(String(buffer: buffer)))
        }
    }

    /// A corpus of connections mixing every feature; each must produce the same bytes and
    /// events whatever the split.
    static let corpus: [String] = [
        "GET /a?x=%24MSB_TOKEN HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Basic dTokTVNCX1RPS0VO\r\nX: $MSB_TOKEN $MSB_TOKEN2\r\n\r\n"
            + "POST /b HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 30\r\n\r\n{\"k\":\"$MSB_TOKEN\",\"l\":\"%24MSB_T\"}"
            + "POST /c HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n$MS\r\n1\r\nB\r\nA\r\n_TOKEN tai\r\n0\r\n\r\n"
            + "GET /d HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
        "POST /e HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 25\r\n\r\nxx\\u0024MSB_TOKEN yy zz",
        "POST /f HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n%24MS\r\n5\r\nB_TOK\r\n2\r\nEN\r\n0\r\n\r\n",
        "GET /g HTTP/1.1\r\nHost: evil.example.net\r\nX: %2\r\nY: $MSB_TOKEN\r\n\r\n",
    ]

    @Test(arguments: corpus.indices)
    func outputDoesNotDependOnHowTheInputIsSplit(_ index: Int) {
        let s = secret("TOKEN", value: "R", inject: Injection(headers: true, basicAuth: true, query: true, body: true))
        let input = Self.corpus[index]
        let reference = rewrite(input, secrets: [s])
        for chunk in 1...40 {
            let run = rewrite(input, secrets: [s], chunk: chunk)
            #expect(run.bytes == reference.bytes, "chunk \(chunk)")
            #expect(run.events == reference.events, "chunk \(chunk)")
        }
    }

    @Test func randomSplitsOfAPlaceholderDenseStream() {
        var generator = SplitMix(seed: 42)
        let s = secret("TOKEN", value: "VALUE", inject: Injection(body: true))
        let pieces = ["$MSB_TOKEN", "%24MSB_TOKEN", "$MSB_TOKENX", "$MSB_", "%", "%2", "$", "\\u00", "plain ", "\r\n"]
        for _ in 0..<50 {
            var body = ""
            for _ in 0..<40 { body += pieces[Int(generator.next() % UInt64(pieces.count))] }
            let input = "POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
                + String(body.utf8.count, radix: 16) + "\r\n" + body + "\r\n0\r\n\r\n"
            let reference = rewrite(input, secrets: [s])
            #expect(reference.status == .open)
            #expect(!reference.text.contains("$MSB_TOKEN\r") && !reference.text.contains("$MSB_TOKEN$"))
            for _ in 0..<5 {
                let chunk = Int(generator.next() % 17) + 1
                #expect(rewrite(input, secrets: [s], chunk: chunk).bytes == reference.bytes)
            }
        }
    }
}

struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

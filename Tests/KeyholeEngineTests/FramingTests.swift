import KeyholeEngine
import NIOCore
import KeyholePolicy
import Testing

@Suite("HTTP framing defences")
struct FramingTests {
    @Test(arguments: [
        ("POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", FramingError.contentLengthWithTransferEncoding),
        ("POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", .contentLengthWithTransferEncoding),
        ("POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", .conflictingContentLength),
        ("POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 3, 4\r\n\r\n", .conflictingContentLength),
        ("POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: +3\r\n\r\n", .invalidContentLength),
        ("POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 0x10\r\n\r\n", .invalidContentLength),
        ("POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", .unsupportedTransferEncoding),
        ("POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", .unsupportedTransferEncoding),
        ("POST / HTTP/1.0\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n", .transferEncodingInHTTP10),
        ("GET / HTTP/1.1\r\nHost: api.example.com\r\nX: a\r\n folded\r\n\r\n", .obsFold),
        ("GET / HTTP/1.1\r\nHost: api.example.com\r\nX: a\0b\r\n\r\n", .nulByte),
        ("GET / HTTP/1.1\r\nHost: api.example.com\r\nX: a\rb\r\n\r\n", .bareCR),
        ("GET / HTTP/1.1\r\nHost: api.example.com\nX: a\r\n\r\n", .bareLF),
        ("GET / HTTP/1.1\r\nHost: api.example.com\r\nX: a\u{1}b\r\n\r\n", .controlCharacter),
        ("GET / HTTP/1.1\r\nHost : api.example.com\r\n\r\n", .invalidHeaderName),
        ("GET / HTTP/1.1\r\n: empty\r\n\r\n", .invalidHeaderName),
        ("GET /  HTTP/1.1\r\nHost: api.example.com\r\n\r\n", .malformedRequestLine),
        ("GET / HTTP/2.0\r\nHost: api.example.com\r\n\r\n", .unsupportedHTTPVersion),
        ("GET / FOO/1.1\r\nHost: api.example.com\r\n\r\n", .malformedRequestLine),
        ("POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", .malformedChunk),
        ("POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", .malformedChunk),
        ("POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n", .malformedChunk),
    ])
    func rejected(_ input: String, _ expected: FramingError) {
        for chunk in [1, 3, nil] as [Int?] {
            let run = rewrite(input + "GET /smuggled HTTP/1.1\r\nHost: api.example.com\r\n\r\n", chunk: chunk)
            #expect(run.framingErrors == [expected], "chunk \(String(describing: chunk))")
            #expect(run.status == .blocked)
            #expect(!run.text.contains("smuggled"))
            // Nothing of the offending request's head goes upstream.
            if !expected.rawValue.contains("chunk") { #expect(run.bytes.isEmpty) }
        }
    }

    @Test func oversizeHeaderBlock() {
        let big = String(repeating: "a", count: 70_000)
        for chunk in [nil, 4096] as [Int?] {
            let run = rewrite("GET / HTTP/1.1\r\nHost: api.example.com\r\nX: \(big)\r\n\r\n", chunk: chunk)
            #expect(run.framingErrors == [.headerBlockTooLarge])
            #expect(run.bytes.isEmpty)
        }
        // The limit is exact, however the head is split: 65,536 bytes pass, 65,537 do not.
        func head(length: Int) -> String {
            let start = "GET / HTTP/1.1\r\nHost: api.example.com\r\nX: "
            return start + String(repeating: "b", count: length - start.utf8.count - 4) + "\r\n\r\n"
        }
        for chunk in [nil, 1, 1000, 65_535, 65_536] as [Int?] {
            #expect(rewrite(head(length: 65_536), chunk: chunk).bytes.count == 65_536, "chunk \(chunk ?? 0)")
            #expect(rewrite(head(length: 65_537), chunk: chunk).framingErrors == [.headerBlockTooLarge], "chunk \(chunk ?? 0)")
        }
        // A head that never ends is refused once it passes the limit: no unbounded buffering.
        let endless = rewrite("GET / HTTP/1.1\r\nX: " + big, chunk: 1000, finish: false)
        #expect(endless.framingErrors == [.headerBlockTooLarge])
    }

    @Test func trailersThatDripInAreReassembled() {
        // 60 KiB of trailers a byte at a time (the trailer buffer has one owner while it
        // grows, so this is linear; bench measures it).
        let trailer = "X-T: " + String(repeating: "t", count: 60_000) + "\r\n\r\n"
        let input = "POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n" + trailer
        let run = rewrite(input, chunk: 1)
        #expect(run.framingErrors.isEmpty)
        #expect(run.text.hasSuffix(trailer))
    }

    @Test func aBodyStartsAtATokenBoundaryWhateverThePreviousBodyEndedWith() {
        // `PH_TOKEN` starts with a token character; the first body ends with one.
        let custom = secret("TOKEN", value: "real", inject: Injection(body: true), placeholder: "PH_TOKEN")
        let first = "POST /a HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 3\r\n\r\nabc"
        let second = "POST /b HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 8\r\n\r\nPH_TOKEN"
        for chunk in [nil, 1, 7] as [Int?] {
            let run = rewrite(first + second, secrets: [custom], chunk: chunk)
            #expect(run.text.hasSuffix("Content-Length: 4\r\n\r\nreal"), "chunk \(chunk ?? 0): \(run.text)")
        }
        // Chunked too.
        let chunked = "POST /c HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nPH_TOKEN\r\n0\r\n\r\n"
        #expect(rewrite(first + chunked, secrets: [custom]).text.contains("\r\nreal\r\n"))
    }

    @Test func bodyLargerThanTheSubstitutionLimitIsRejectedNotSentWithAWrongLength() {
        let s = secret("TOKEN", value: "V", inject: Injection(body: true))
        var configuration = RewriterConfiguration()
        configuration.maxHeldBody = 16
        let run = rewrite(
            "POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 17\r\n\r\n$MSB_TOKEN1234567", secrets: [s],
            configuration: configuration)
        #expect(run.framingErrors == [.bodyTooLargeToSubstitute])
        #expect(run.bytes.isEmpty)
    }

    @Test func identicalRepeatedContentLengthsAreAcceptedAndCollapsedWhenRewritten() {
        let s = secret("TOKEN", value: "V", inject: Injection(body: true))
        let run = rewrite(
            "POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 10\r\nContent-Length: 10\r\n\r\n$MSB_TOKEN", secrets: [s])
        #expect(run.text == "POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 1\r\n\r\nV")
    }

    @Test func leadingEmptyLinesBetweenRequestsAreIgnored() {
        let run = rewrite("\r\n\r\nGET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n\r\nGET /2 HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        #expect(run.text == "GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\nGET /2 HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    }

    @Test func aConnectionCutMidRequestIsReported() {
        let run = rewrite("POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 10\r\n\r\nabc")
        #expect(run.framingErrors == [.incompleteRequest])
    }
}

@Suite("Upgrades and opaque streams")
struct UpgradeTests {
    let upgradeRequest = "GET /ws HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nAuthorization: Bearer $MSB_TOKEN\r\n\r\n"

    @Test func theUpgradeRequestIsRewrittenAndTheStreamAfterIsRelayed() {
        let frames = "\u{81}\u{05}hello-binary-frames"
        let run = rewrite(upgradeRequest + frames, upgrade: true)
        #expect(run.text == upgradeRequest.replacingOccurrences(of: "$MSB_TOKEN", with: "real-token-value") + frames)
        #expect(run.status == .open)
    }

    @Test func bytesAfterTheUpgradeAreHeldUntilTheUpstreamAnswers() {
        let rewriter = RequestRewriter(identity: .verifiedTLS(sni: "api.example.com"), secrets: [token])
        var output = RewriteOutput()
        rewriter.consume(.init(string: upgradeRequest + "early"), into: &output)
        #expect(rewriter.status == .awaitingUpgradeDecision)
        #expect(!output.upstream.map { String(buffer: $0) }.joined().contains("early"))
        rewriter.upgradeAccepted(into: &output)
        #expect(output.upstream.map { String(buffer: $0) }.joined().hasSuffix("early"))
    }

    @Test func aPlaceholderInTheUpgradedStreamIsAViolation() {
        for chunk in chunkSizes {
            let run = rewrite(upgradeRequest + "frame-one|$MSB_TOKEN|frame-two", chunk: chunk, upgrade: true)
            #expect(run.violations.first?.site == .upgraded)
            #expect(run.text.hasSuffix("frame-one|"))
        }
    }

    @Test func aDeclinedUpgradeContinuesAsHTTP() {
        let next = "GET /next HTTP/1.1\r\nHost: api.example.com\r\nX: $MSB_TOKEN\r\n\r\n"
        let run = rewrite(upgradeRequest + next, upgrade: false)
        #expect(run.text.hasSuffix("GET /next HTTP/1.1\r\nHost: api.example.com\r\nX: real-token-value\r\n\r\n"))
    }

    @Test func opaqueStreamsAreRelayedAndScanned() {
        let clean = rewrite("SSH-2.0-OpenSSH_9.2\r\nbinary\u{0}stuff", mode: .opaque)
        #expect(clean.text == "SSH-2.0-OpenSSH_9.2\r\nbinary\u{0}stuff")
        let leaking = rewrite("hello $MSB_TOKEN bye", mode: .opaque)
        #expect(leaking.text == "hello ")
        #expect(leaking.violations.first?.site == .opaque)
    }
}

/// Held bodies share one budget per process: a guest cannot make the proxy hold more than
/// it allows, whatever it spreads over how many connections.
@Suite("Held body budget")
struct HeldBodyBudgetTests {
    let bodySecret = secret("TOKEN", value: "V", inject: Injection(body: true))

    func start(_ length: Int, _ budget: HeldBodyBudget) -> (RequestRewriter, [RewriteEvent]) {
        let rewriter = RequestRewriter(identity: .verifiedTLS(sni: "api.example.com"), secrets: [bodySecret], heldBodyBudget: budget)
        var output = RewriteOutput()
        rewriter.consume(ByteBuffer(string: "POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: \(length)\r\n\r\nab"), into: &output)
        return (rewriter, output.events)
    }

    @Test func aBodyThatDoesNotFitIsRefusedAndReleasedBudgetIsReused() {
        let budget = HeldBodyBudget(limit: 100)
        var (first, events) = start(80, budget)
        #expect(events.isEmpty)
        #expect(budget.inUse == 80)
        let (_, refused) = start(30, budget)
        #expect(refused.contains { if case .framingError(.heldBodyBudgetExhausted, _) = $0 { return true } else { return false } })
        // The first body completes: its share comes back.
        var output = RewriteOutput()
        first.consume(ByteBuffer(string: String(repeating: "x", count: 78)), into: &output)
        #expect(budget.inUse == 0)
        (first, events) = start(90, budget)
        #expect(events.isEmpty)
        #expect(budget.inUse == 90)
        _ = first
    }

    @Test func aConnectionThatGoesAwayGivesItsShareBack() {
        let budget = HeldBodyBudget(limit: 100)
        do {
            let (rewriter, _) = start(60, budget)
            #expect(budget.inUse == 60)
            _ = rewriter
        }
        #expect(budget.inUse == 0)
    }
}

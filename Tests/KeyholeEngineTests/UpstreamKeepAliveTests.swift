import KeyholeEngine
import KeyholePolicy
import NIOCore
import Testing

/// What the engine tells the proxy so an upstream connection can outlive its guest
/// connection (the proxy's upstream pool): a guest's `Connection: close` kept from the
/// upstream, the guest told and closed after its response, and when the upstream
/// connection is clean enough to carry another guest's requests.
@Suite("Upstream keep-alive")
struct UpstreamKeepAliveTests {
    static var keepAlive: RewriterConfiguration {
        var configuration = RewriterConfiguration()
        configuration.keepUpstreamAlive = true
        return configuration
    }

    @Test func aGuestsConnectionCloseIsKeptFromTheUpstreamWhateverTheSplit() {
        let request = "GET /a HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\nAuthorization: Bearer $MSB_TOKEN\r\n\r\n"
        for chunk in [nil, 1, 7] as [Int?] {
            let run = rewrite(request, chunk: chunk, configuration: Self.keepAlive)
            #expect(run.text == "GET /a HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer real-token-value\r\n\r\n")
            #expect(run.output.expectedResponses.map(\.closeAfter) == [true])
        }
    }

    @Test func nothingAfterARequestThatAskedToCloseGoesUpstream() {
        // The guest may not send more after `Connection: close`; with the close kept from
        // the upstream, a pipelined request would be read there: it goes nowhere instead.
        let request = "GET /a HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"
        let next = "POST /b HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 3\r\n\r\nabc"
        for chunk in [nil, 1, 5] as [Int?] {
            let run = rewrite(request + next, chunk: chunk, configuration: Self.keepAlive)
            #expect(run.text == "GET /a HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
            #expect(run.output.expectedResponses.count == 1)
            #expect(run.status == .open && run.events.isEmpty)
        }
    }

    @Test func everyConnectionLineGoesAndOtherTokensCountToo() {
        let request = "GET / HTTP/1.1\r\nConnection: keep-alive\r\nHost: api.example.com\r\nconnection:  TE , Close \r\nTE: trailers\r\n\r\n"
        let run = rewrite(request, configuration: Self.keepAlive)
        #expect(run.text == "GET / HTTP/1.1\r\nHost: api.example.com\r\nTE: trailers\r\n\r\n")
        #expect(run.output.expectedResponses.first?.closeAfter == true)
    }

    @Test func withoutCloseOrWithoutTheSettingNothingChanges() {
        let keepAlive = "GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: keep-alive\r\n\r\n"
        let kept = rewrite(keepAlive, configuration: Self.keepAlive)
        #expect(kept.text == keepAlive)
        #expect(kept.output.expectedResponses.first?.closeAfter == false)
        // The default: the upstream gets the close, as the guest sent it.
        let close = "GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"
        let plain = rewrite(close)
        #expect(plain.text == close)
        #expect(plain.output.expectedResponses.first?.closeAfter == false)
    }

    @Test func upgradesAndHTTP10AreLeftAlone() {
        let upgrade = "GET /ws HTTP/1.1\r\nHost: api.example.com\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\r\n"
        let run = rewrite(upgrade, configuration: Self.keepAlive, upgrade: false)
        #expect(run.text == upgrade)
        #expect(run.output.expectedResponses.first?.closeAfter == false)
        let old = "GET / HTTP/1.0\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"
        let run10 = rewrite(old, configuration: Self.keepAlive)
        #expect(run10.text == old)
    }

    @Test func aCloseThatStillGoesUpstreamMakesTheConnectionUnreusable() {
        // A substitution in the Connection line itself: Keyhole leaves the line as it is, so
        // the upstream is asked to close, and the connection must not be pooled.
        var inject = Injection()
        inject.headers = true
        let request = "GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close, $MSB_TOKEN\r\n\r\n"
        let run = rewrite(request, secrets: [secret("TOKEN", value: "real-token-value", inject: inject)], configuration: Self.keepAlive)
        #expect(run.text == "GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close, real-token-value\r\n\r\n")
        let expected = run.output.expectedResponses
        #expect(expected.map(\.closeAfter) == [false])
        #expect(expected.map(\.upstreamCloses) == [true])
        let (_, masker) = mask("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", expected)
        #expect(!masker.upstreamReusable)
    }

    @Test func aPlaceholderInTheConnectionLineIsStillAViolation() {
        let request = "GET / HTTP/1.1\r\nHost: evil.example.net\r\nConnection: close, $MSB_TOKEN\r\n\r\n"
        let run = rewrite(request, identity: .verifiedTLS(sni: "evil.example.net"), configuration: Self.keepAlive)
        #expect(run.status == .blocked)
        #expect(run.text.isEmpty)
    }

    // MARK: responses

    func mask(_ response: String, _ requests: [ExpectedResponse], chunk: Int? = nil) -> (String, ResponseMasker) {
        let masker = ResponseMasker(secrets: [token], masking: true)
        for request in requests { masker.expect(request) }
        var output = MaskOutput()
        let bytes = Array(response.utf8)
        let size = max(1, chunk ?? bytes.count)
        var offset = 0
        while offset < bytes.count {
            masker.consume(ByteBuffer(bytes: bytes[offset..<min(bytes.count, offset + size)]), into: &output)
            offset += size
        }
        return (output.guest.map { String(buffer: $0) }.joined(), masker)
    }

    @Test func theGuestIsToldTheConnectionClosesAndNothingAfterTheResponseReachesIt() {
        let response = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"
        for chunk in [nil, 1, 3] as [Int?] {
            let (text, masker) = mask(response, [ExpectedResponse(closeAfter: true)], chunk: chunk)
            #expect(text == "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            #expect(masker.guestCloseDue)
            // Bytes after it were never asked for: that upstream connection is not reused.
            #expect(!masker.upstreamReusable)
        }
        let (_, clean) = mask("HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n", [ExpectedResponse(closeAfter: true)])
        #expect(clean.guestCloseDue && clean.upstreamReusable)
        // A response that already says close is not told twice.
        let (said, _) = mask("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", [ExpectedResponse(closeAfter: true)])
        #expect(said == "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    }

    @Test func onlyLengthOrChunkFramedKeepAliveResponsesLeaveTheUpstreamReusable() {
        let reusable = [
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\n\r\n",
        ]
        for response in reusable {
            let (_, masker) = mask(response, [ExpectedResponse()])
            #expect(masker.upstreamReusable && masker.betweenResponses && masker.outstandingResponses == 0, "\(response)")
        }
        let notReusable: [(String, ExpectedResponse)] = [
            ("HTTP/1.1 200 OK\r\nConnection: Keep-Alive, close\r\nContent-Length: 2\r\n\r\nok", ExpectedResponse()),
            ("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", ExpectedResponse()),
            ("HTTP/1.1 200 OK\r\n\r\nuntil the upstream closes", ExpectedResponse()),
            ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", ExpectedResponse(http10: true)),
            ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", ExpectedResponse(upgrade: ["websocket"])),
            ("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", ExpectedResponse()),
        ]
        for (response, request) in notReusable {
            let (_, masker) = mask(response, [request])
            #expect(!masker.upstreamReusable, "\(response)")
        }
        // A response nobody asked for.
        let (_, unasked) = mask("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", [ExpectedResponse()])
        #expect(!unasked.upstreamReusable)
        // Half a response: not between responses.
        let (_, half) = mask("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", [ExpectedResponse()])
        #expect(!half.betweenResponses || half.outstandingResponses > 0)
    }

    @Test func theRewriterSaysWhenItIsBetweenRequests() {
        let rewriter = RequestRewriter(identity: .verifiedTLS(sni: "api.example.com"), secrets: [token], configuration: Self.keepAlive)
        var output = RewriteOutput()
        #expect(rewriter.betweenRequests)
        rewriter.consume(ByteBuffer(string: "POST / HTTP/1.1\r\nHost: api.exa"), into: &output)
        #expect(!rewriter.betweenRequests)
        rewriter.consume(ByteBuffer(string: "mple.com\r\nContent-Length: 4\r\n\r\nab"), into: &output)
        #expect(!rewriter.betweenRequests)
        rewriter.consume(ByteBuffer(string: "cd"), into: &output)
        #expect(rewriter.betweenRequests)
    }
}

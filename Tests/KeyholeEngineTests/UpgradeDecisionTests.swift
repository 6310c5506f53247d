import KeyholeEngine
import NIOCore
import Testing

/// Upgrades are decided from the request/response pair (`ResponseMasker` reads the response
/// to the upgrade request, split anywhere), never by sniffing the first bytes.
@Suite("Upgrade decisions")
struct UpgradeDecisionTests {
    enum Decision: Equatable {
        case outcome(UpgradeDecision.Outcome)
        case refused(ResponseFramingError)
    }

    func decide(_ response: String, upgrade: String? = "websocket", connect: Bool = false, pieces: Int? = nil) -> Decision? {
        let masker = ResponseMasker(secrets: [], masking: false)
        masker.expect(ExpectedResponse(isConnect: connect, upgrade: upgrade.map { [$0] } ?? []))
        let bytes = Array(response.utf8)
        let size = max(1, pieces ?? bytes.count)
        var output = MaskOutput()
        var offset = 0
        while offset < bytes.count {
            masker.consume(ByteBuffer(bytes: bytes[offset..<min(bytes.count, offset + size)]), into: &output)
            offset += size
        }
        for event in output.events {
            switch event {
            case .upgrade(let outcome): return .outcome(outcome)
            case .framingError(let error, _): return .refused(error)
            case .masked: continue
            }
        }
        return nil
    }

    let switching = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n"

    @Test func a101ForTheRequestedProtocolAcceptsHoweverItIsSplit() {
        for pieces in [nil, 1, 2, 5, 11, 12, 13] as [Int?] {
            #expect(decide(switching, pieces: pieces) == .outcome(.accepted(protocol: "websocket")), "pieces \(pieces ?? 0)")
        }
        #expect(decide(switching.replacingOccurrences(of: "Upgrade: websocket", with: "upgrade:  WebSocket ")) == .outcome(.accepted(protocol: "websocket")))
    }

    @Test func anOrdinaryAnswerToAnUpgradeRequestDeclines() {
        // The lab: a 200 to `Upgrade: h2c` turned the connection into a relay.
        #expect(decide("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", upgrade: "h2c") == .outcome(.declined))
        #expect(decide("HTTP/1.1 426 Upgrade Required\r\n\r\n") == .outcome(.declined))
    }

    @Test func aSwitchToSomethingElseOrToNotHTTPIsRefused() {
        // The upstream would speak another protocol than the one asked for: reset.
        #expect(decide("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n") == .refused(.unrequestedSwitch))
        #expect(decide("HTTP/1.1 101 Switching Protocols\r\n\r\n") == .refused(.unrequestedSwitch))
        #expect(decide("SSH-2.0-OpenSSH\r\n\r\n") == .refused(.malformedHead))
    }

    @Test func informationalResponsesAreSkipped() {
        #expect(decide("HTTP/1.1 100 Continue\r\n\r\n" + switching, pieces: 3) == .outcome(.accepted(protocol: "websocket")))
        #expect(decide("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n\r\n") == .outcome(.declined))
        #expect(decide("HTTP/1.1 100 Continue\r\n\r\n") == nil, "undecided until a final response")
    }

    @Test func connectIsDecidedByA2xx() {
        #expect(decide("HTTP/1.1 200 Connection established\r\n\r\n", upgrade: nil, connect: true) == .outcome(.accepted(protocol: nil)))
        #expect(decide("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", upgrade: nil, connect: true) == .outcome(.declined))
    }

    @Test func anEndlessHeadIsRefused() {
        let endless = "HTTP/1.1 101 Switching Protocols\r\nX: " + String(repeating: "x", count: ResponseMasker.maxHead)
        #expect(decide(endless, pieces: 4096) == .refused(.headTooLarge))
    }
}

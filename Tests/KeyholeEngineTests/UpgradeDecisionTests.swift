import KeyholeEngine
import NIOCore
import Testing

/// Upgrades are decided from the request/response pair, with the response head parsed
/// (split anywhere), never by sniffing the first bytes.
@Suite("Upgrade decisions")
struct UpgradeDecisionTests {
    func decide(_ response: String, upgrade: String? = "websocket", connect: Bool = false, pieces: Int? = nil) -> UpgradeDecision.Outcome? {
        var decision = UpgradeDecision(upgrade: upgrade, connect: connect)
        let bytes = Array(response.utf8)
        let size = max(1, pieces ?? bytes.count)
        var outcome: UpgradeDecision.Outcome?
        var offset = 0
        while offset < bytes.count, outcome == nil {
            outcome = decision.feed(ByteBuffer(bytes: bytes[offset..<min(bytes.count, offset + size)]))
            offset += size
        }
        return outcome
    }

    let switching = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n"

    @Test func a101ForTheRequestedProtocolAcceptsHoweverItIsSplit() {
        for pieces in [nil, 1, 2, 5, 11, 12, 13] as [Int?] {
            #expect(decide(switching, pieces: pieces) == .accepted(protocol: "websocket"), "pieces \(pieces ?? 0)")
        }
        #expect(decide(switching.replacingOccurrences(of: "Upgrade: websocket", with: "upgrade:  WebSocket ")) == .accepted(protocol: "websocket"))
    }

    @Test func anOrdinaryAnswerToAnUpgradeRequestDeclines() {
        // The lab: a 200 to `Upgrade: h2c` turned the connection into a relay.
        #expect(decide("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", upgrade: "h2c") == .declined)
        #expect(decide("HTTP/1.1 426 Upgrade Required\r\n\r\n") == .declined)
        // A 101 for another protocol than requested.
        #expect(decide("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n") == .declined)
        #expect(decide("HTTP/1.1 101 Switching Protocols\r\n\r\n") == .declined)
        // Not HTTP at all.
        #expect(decide("SSH-2.0-OpenSSH\r\n\r\n") == .declined)
    }

    @Test func informationalResponsesAreSkipped() {
        #expect(decide("HTTP/1.1 100 Continue\r\n\r\n" + switching, pieces: 3) == .accepted(protocol: "websocket"))
        #expect(decide("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n\r\n") == .declined)
        #expect(decide("HTTP/1.1 100 Continue\r\n\r\n") == nil, "undecided until a final response")
    }

    @Test func connectIsDecidedByA2xx() {
        #expect(decide("HTTP/1.1 200 Connection established\r\n\r\n", upgrade: nil, connect: true) == .accepted(protocol: nil))
        #expect(decide("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", upgrade: nil, connect: true) == .declined)
    }

    @Test func anEndlessHeadDeclines() {
        let endless = "HTTP/1.1 101 Switching Protocols\r\nX: " + String(repeating: "x", count: UpgradeDecision.maxHead)
        #expect(decide(endless, pieces: 4096) == .declined)
    }
}

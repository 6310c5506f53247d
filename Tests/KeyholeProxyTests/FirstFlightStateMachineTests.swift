import NIOCore
import Testing

@testable import KeyholeProxy

/// The start of a guest connection, without sockets: every transition, and the bugs the
/// lab found (bytes read while the upstream connected were lost; banners waited 5 s).
@Suite("First flight state machine")
struct FirstFlightStateMachineTests {
    typealias Machine = FirstFlightStateMachine

    let clientHello: [UInt8] = {
        // A minimal TLS 1.2 ClientHello with SNI api.example.test.
        let name = Array("api.example.test".utf8)
        var sni: [UInt8] = [0x00, 0x00]  // server_name extension
        let list: [UInt8] = [0x00] + [UInt8(name.count >> 8), UInt8(name.count & 0xFF)] + name
        let ext = [UInt8(list.count >> 8), UInt8(list.count & 0xFF)] + list
        sni += [UInt8(ext.count >> 8), UInt8(ext.count & 0xFF)] + ext
        var body: [UInt8] = [0x03, 0x03] + [UInt8](repeating: 7, count: 32) + [0x00]  // version, random, session id
        body += [0x00, 0x02, 0x13, 0x01, 0x01, 0x00]  // one cipher suite, null compression
        body += [UInt8(sni.count >> 8), UInt8(sni.count & 0xFF)] + sni
        let handshake: [UInt8] = [0x01, 0x00, UInt8(body.count >> 8), UInt8(body.count & 0xFF)] + body
        return [0x16, 0x03, 0x01, UInt8(handshake.count >> 8), UInt8(handshake.count & 0xFF)] + handshake
    }()

    func buffer(_ text: String) -> ByteBuffer { ByteBuffer(string: text) }

    @Test func theUpstreamIsConnectedAsSoonAsTheDestinationIsKnown() {
        var machine = Machine()
        #expect(machine.destinationKnown() == [.connect])
        #expect(machine.state == .connecting(kind: nil))
    }

    @Test func withAPooledConnectionIdleNothingConnectsUntilTheFirstFlightIsClassified() {
        // TLS: set up at once (the session takes the pooled connection, or connects then).
        var machine = Machine()
        #expect(machine.destinationKnown(deferConnect: true) == [])
        #expect(machine.guestRead(ByteBuffer(bytes: clientHello.prefix(20))) == [])
        #expect(machine.guestRead(ByteBuffer(bytes: clientHello.dropFirst(20))) == [.stopReading, .setUp(.tls(serverName: "api.example.test"))])
        #expect(machine.setUpDone().map { Array($0.readableBytesView) } == clientHello)
        // Bytes that came before the destination was read are classified on the spot.
        var early = Machine()
        _ = early.guestRead(buffer("GET / HTTP/1.1\r\n"))
        #expect(early.destinationKnown(deferConnect: true) == [.stopReading, .setUp(.http)])
        // A silent guest is opaque at the timeout, as with a connected upstream.
        var silent = Machine()
        _ = silent.destinationKnown(deferConnect: true)
        #expect(silent.timeout() == [.stopReading, .setUp(.opaque)])
        // A CONNECT still needs no upstream.
        var proxy = Machine()
        _ = proxy.destinationKnown(deferConnect: true)
        #expect(proxy.guestRead(buffer("CONNECT api.example.test:443 HTTP/1.1\r\n\r\n")) == [.stopReading, .tunnel])
    }

    @Test func everyByteReadBeforeTheHandOverIsReplayedInOrder() {
        // A plain-HTTP first flight over 2 KiB: its head in one read, the body in the next
        // ones, some while the upstream is still connecting (the lab lost all of those).
        var machine = Machine()
        _ = machine.destinationKnown()
        let head = "POST /upload HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 3072\r\n\r\n"
        #expect(machine.guestRead(buffer(head)) == [.stopReading])
        #expect(machine.state == .connecting(kind: .http))
        let body = String(repeating: "b", count: 3072)
        #expect(machine.guestRead(buffer(String(body.prefix(2000)))) == [])  // a read already in flight
        #expect(machine.upstreamConnected() == [.setUp(.http)])
        #expect(machine.guestRead(buffer(String(body.dropFirst(2000)))) == [])
        let replay = machine.setUpDone()
        #expect(replay.map { String(buffer: $0) } == head + body)
        #expect(machine.state == .done)
        #expect(machine.setUpDone() == nil, "handed over once")
    }

    @Test func aClientHelloIsTLSWithItsServerName() {
        var machine = Machine()
        _ = machine.destinationKnown()
        #expect(machine.upstreamConnected() == [])
        #expect(machine.state == .connected)
        #expect(machine.guestRead(ByteBuffer(bytes: clientHello.prefix(20))) == [], "a partial ClientHello waits")
        #expect(machine.guestRead(ByteBuffer(bytes: clientHello.dropFirst(20))) == [.stopReading, .setUp(.tls(serverName: "api.example.test"))])
    }

    @Test func aServerThatSpeaksFirstIsRelayedAtOnce() {
        var machine = Machine()
        _ = machine.destinationKnown()
        _ = machine.upstreamConnected()
        #expect(machine.upstreamSpoke() == [.stopReading, .setUp(.opaque)])
        // The guest answering the banner afterwards does not change the decision.
        #expect(machine.guestRead(buffer("EHLO guest\r\n")) == [])
        #expect(machine.setUpDone().map { String(buffer: $0) } == "EHLO guest\r\n")
    }

    @Test func aBannerWhileStillConnectingCannotHappenButSpeakingFirstBeforeClassificationWins() {
        var machine = Machine()
        _ = machine.destinationKnown()
        // Connected and spoke in the same instant (the connect callback comes after).
        #expect(machine.upstreamSpoke() == [.stopReading, .setUp(.opaque)])
        #expect(machine.upstreamConnected() == [])
    }

    @Test func silenceOnBothSidesIsOpaqueAfterTheTimeout() {
        var machine = Machine()
        _ = machine.destinationKnown()
        _ = machine.upstreamConnected()
        #expect(machine.timeout() == [.stopReading, .setUp(.opaque)])
        // Before the connect completes, the timeout decides and the connect then sets up.
        var early = Machine()
        _ = early.destinationKnown()
        #expect(early.timeout() == [.stopReading])
        #expect(early.upstreamConnected() == [.setUp(.opaque)])
    }

    @Test func anythingElseIsOpaqueAfterSixteenBytes() {
        var machine = Machine()
        _ = machine.destinationKnown()
        _ = machine.upstreamConnected()
        #expect(machine.guestRead(buffer("\u{1}\u{2}binary")) == [.stopReading, .setUp(.opaque)])
        var shortHTTP = Machine()
        _ = shortHTTP.destinationKnown()
        _ = shortHTTP.upstreamConnected()
        #expect(shortHTTP.guestRead(buffer("GE")) == [], "too few bytes to tell")
        #expect(shortHTTP.guestRead(buffer("T / HTTP/1.1\r\n")) == [.stopReading, .setUp(.http)])
    }

    @Test func bytesBeforeTheDestinationAreClassifiedOnceItIsKnown() {
        var machine = Machine()
        #expect(machine.guestRead(buffer("GET / HTTP/1.1\r\n")) == [])
        #expect(machine.destinationKnown() == [.connect, .stopReading])
        #expect(machine.upstreamConnected() == [.setUp(.http)])
    }

    @Test func theBufferIsBoundedWhileUndecided() {
        var machine = Machine()
        _ = machine.destinationKnown()
        // A TLS record header announcing a big record keeps the ClientHello "incomplete".
        let header = ByteBuffer(bytes: [0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3F, 0xFC])
        #expect(machine.guestRead(header) == [])
        let actions = machine.guestRead(ByteBuffer(repeating: 0, count: Machine.maxBuffered))
        #expect(actions == [.stopReading], "at the bound: decided, and no more reading")
        #expect(machine.state != .connecting(kind: nil))
    }

    @Test func failuresReset() {
        var machine = Machine()
        _ = machine.destinationKnown()
        #expect(machine.guestRead(buffer("GET / HTTP/1.1\r\n")) == [.stopReading])
        #expect(machine.upstreamFailed() == [.reset(reason: "upstream unavailable")])
        #expect(machine.upstreamFailed() == [])
        var never = Machine()
        #expect(never.timeout() == [.reset(reason: "no original destination in time")])
        // An upstream that fails before the guest has said anything: only a CONNECT, which
        // needs no upstream, can go on; anything else is reset when it shows, or at the timeout.
        var silent = Machine()
        _ = silent.destinationKnown()
        #expect(silent.upstreamFailed() == [])
        #expect(silent.state == .upstreamLost)
        #expect(silent.guestRead(buffer("GET / HTTP/1.1\r\n")) == [.reset(reason: "upstream unavailable")])
        var quiet = Machine()
        _ = quiet.destinationKnown()
        _ = quiet.upstreamFailed()
        #expect(quiet.timeout() == [.reset(reason: "upstream unavailable")])
    }

    static let connect = "CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n"

    @Test func aConnectIsAnsweredWhateverTheOriginalDestinationDoes() {
        for upstream in ["connected", "failed-before", "failed-after", "pending"] {
            var machine = Machine()
            #expect(machine.destinationKnown() == [.connect])
            if upstream == "connected" { #expect(machine.upstreamConnected() == []) }
            if upstream == "failed-before" { #expect(machine.upstreamFailed() == []) }
            #expect(machine.guestRead(buffer(Self.connect + "\u{16}\u{3}\u{1}")) == [.stopReading, .tunnel], "\(upstream)")
            if upstream == "failed-after" { #expect(machine.upstreamFailed() == []) }
            // The whole request and what followed it, for the tunnel.
            #expect(machine.takeTunnelRequest().map { String(buffer: $0) } == Self.connect + "\u{16}\u{3}\u{1}")
            #expect(machine.upstreamConnected() == [] && machine.upstreamFailed() == [] && machine.timeout() == [])
            #expect(machine.takeTunnelRequest() == nil)
        }
    }

    /// Reads already in flight when reading stopped are kept for the replay, but a guest
    /// that goes on sending (an upstream that never completes its handshake) is cut off.
    @Test func whatArrivesWhileTheGuestIsNotReadIsBounded() {
        var machine = Machine()
        _ = machine.destinationKnown()
        #expect(machine.guestRead(ByteBuffer(bytes: clientHello)) == [.stopReading])
        var total = clientHello.count
        var actions: [Machine.Action] = []
        while actions.isEmpty && total < 10 * Machine.maxHeld {
            actions = machine.guestRead(ByteBuffer(repeating: 0x41, count: 2048))
            total += 2048
        }
        #expect(actions == [.reset(reason: "the guest sent past the first-flight bound while it was not read")])
        #expect(total > Machine.maxHeld && total <= Machine.maxHeld + 2048)
        #expect(machine.upstreamConnected() == [])
        var tunnel = Machine()
        _ = tunnel.destinationKnown()
        _ = tunnel.guestRead(buffer(Self.connect))
        _ = tunnel.takeTunnelRequest()
        #expect(tunnel.guestRead(buffer("more")) == [])
        #expect(tunnel.takeLeftover().map { String(buffer: $0) } == "more")
    }

    @Test func aConnectHeadSplitAnywhereIsWaitedForAndOneThatNeverEndsIsRefused() {
        var machine = Machine()
        _ = machine.destinationKnown()
        #expect(machine.guestRead(buffer("CON")) == [])
        #expect(machine.guestRead(buffer("NECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r")) == [])
        #expect(machine.guestRead(buffer("\n")) == [.stopReading, .tunnel])
        // Past the bound it is still a CONNECT (which the tunnel refuses), never HTTP for
        // the original destination.
        var long = Machine()
        _ = long.destinationKnown()
        #expect(long.guestRead(buffer("CONNECT a.example:443 HTTP/1.1\r\nX: " + String(repeating: "a", count: Machine.maxBuffered))) == [.stopReading, .tunnel])
        // Before the destination is known, too.
        var early = Machine()
        #expect(early.guestRead(buffer(Self.connect)) == [])
        #expect(early.destinationKnown() == [.stopReading, .tunnel])
    }
}

/// The state machine under events in any order (a seeded random walk, many thousands of
/// sequences): whatever happens, the pipelines are set up at most once, only after the
/// upstream is connected, with the guest no longer read, and the replay is every byte the
/// guest sent, in order; nothing happens after a reset or the hand-over.
@Suite("First flight state machine, events in any order")
struct FirstFlightStateMachineWalkTests {
    struct Generator: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    enum Event: CaseIterable { case destination, read, connected, spoke, timeout, failed, setUpDone }

    @Test func invariantsHoldForRandomEventOrders() {
        var random = Generator(state: 2026)
        let chunks = [
            "GET / HT", "TP/1.1\r\nHost: a\r\n\r\n", "\u{16}\u{3}\u{1}", "x", String(repeating: "z", count: 5000), "",
            "CONNECT a.example:443 HTTP/1.1\r\n\r\n",
        ]
        var tunnels = 0
        var setUps = 0
        for _ in 0..<20_000 {
            var machine = FirstFlightStateMachine()
            var sent = ""
            var connected = false
            var stopped = false
            var setUp: FirstFlightStateMachine.Kind?
            var ended = false
            for _ in 0..<Int.random(in: 1...12, using: &random) {
                let event = Event.allCases.randomElement(using: &random)!
                var actions: [FirstFlightStateMachine.Action] = []
                switch event {
                case .destination: actions = machine.destinationKnown()
                case .read:
                    let chunk = chunks.randomElement(using: &random)!
                    if !ended { sent += chunk }
                    actions = machine.guestRead(ByteBuffer(string: chunk))
                case .connected:
                    // The connect completes only once, and only after it was started.
                    guard machine.state != .idle, !connected else { continue }
                    connected = true
                    actions = machine.upstreamConnected()
                case .spoke:
                    guard connected else { continue }
                    actions = machine.upstreamSpoke()
                case .timeout: actions = machine.timeout()
                case .failed: actions = machine.upstreamFailed()
                case .setUpDone:
                    guard setUp != nil, !ended else { continue }
                    let replay = machine.setUpDone().map { String(buffer: $0) } ?? ""
                    #expect(replay == sent, "the replay is every byte sent, in order")
                    ended = true
                }
                for action in actions {
                    #expect(!ended, "no action after a reset or the hand-over: \(action)")
                    switch action {
                    case .stopReading: stopped = true
                    case .setUp(let kind):
                        #expect(setUp == nil, "set up once")
                        #expect(connected, "set up only once connected")
                        #expect(stopped, "the guest is not read while the pipelines are built")
                        setUp = kind
                        setUps += 1
                    case .reset: ended = true
                    case .connect: #expect(!connected)
                    case .tunnel:
                        #expect(setUp == nil && stopped, "a tunnel instead of a set-up, with the guest not read")
                        let request = machine.takeTunnelRequest().map { String(buffer: $0) } ?? ""
                        #expect(request == sent, "the tunnel gets every byte sent, in order")
                        tunnels += 1
                        ended = true
                    }
                }
            }
        }
        #expect(setUps > 1000, "the walk reached the set-up \(setUps) times")
        #expect(tunnels > 100, "the walk opened \(tunnels) tunnels")
    }
}

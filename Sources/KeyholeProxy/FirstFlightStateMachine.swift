import KeyholeTLS
import NIOCore

/// The start of a guest connection, as a state machine apart from its I/O (modelled on
/// NIO's `HTTPServerPipelineHandler` and `NIOSSLHandler` state machines): events in,
/// actions out. The handler that drives it (`FirstFlightHandler`) only performs actions.
///
/// 1. The original destination is known (and egress allows it): connect upstream at once.
/// 2. The guest's first bytes say what the flow is (a TLS ClientHello, an HTTP request,
///    anything else); an upstream that speaks first (SMTP, MySQL, IMAP, FTP banners) makes
///    it opaque at once; silence on both sides for the first-flight timeout, too.
/// 3. Classified and connected: the rest of the pipelines is built. Meanwhile the guest is
///    not read (`stopReading`), and every byte already read is kept, to be replayed, in
///    order, once the pipelines are ready. Nothing read before the decision is lost.
/// 4. A first request `CONNECT host:port` (a guest behind an explicit proxy, `HTTPS_PROXY`)
///    is answered by Keyhole itself: whatever the original destination does (it may not
///    even listen), the tunnel's first bytes are then classified as a fresh flow to the
///    CONNECT host (`tunnel`).
struct FirstFlightStateMachine {
    enum Kind: Equatable, Sendable {
        /// `http2`: the ClientHello offers `h2` (then the upstream is offered it too).
        case tls(serverName: String?, http2: Bool = false)
        case http
        case opaque
    }

    enum Action: Equatable {
        /// Connect to the original destination (TCP only: TLS waits for the classification).
        case connect
        /// Stop reading the guest (classified, or the buffer is full).
        case stopReading
        /// Build the pipelines for `Kind`; replay `takeBuffered()` when done.
        case setUp(Kind)
        /// Nothing to relay to: reset the guest.
        case reset(reason: String)
        /// The guest's first request is a `CONNECT`, whole in `takeBuffered()`: Keyhole
        /// answers it; the original destination's connection is not used.
        case tunnel
    }

    enum State: Equatable {
        /// Waiting for the original destination.
        case idle
        /// Connecting upstream, classifying the guest's bytes.
        case connecting(kind: Kind?)
        /// Connected upstream, waiting for the guest's bytes to classify.
        case connected
        /// Pipelines being built; the guest is not read.
        case settingUp(Kind)
        /// The original destination could not be reached before the guest said anything:
        /// only a `CONNECT` (which does not need it) can still go on.
        case upstreamLost
        /// A `CONNECT` is being answered.
        case tunneling
        /// Handed over to the relay.
        case done
        case failed
    }

    /// What the first bytes are: a flow of some kind, or a whole `CONNECT` request head.
    enum Classification: Equatable {
        case flow(Kind)
        case connect
    }

    /// The most guest bytes a classification needs: the largest ClientHello record (16 KiB
    /// + header) with room to spare. Past this the guest is not read until set-up is done.
    static let maxBuffered = 16 * 1024 + 2048 + 5
    /// What may arrive on top of that from reads already in flight when reading stopped.
    static let maxHeld = 4 * maxBuffered

    /// Undecided, and under the bound: the guest may be read.
    var wantsGuestBytes: Bool {
        switch state {
        case .idle, .connecting(kind: nil), .connected, .upstreamLost: return bufferedBytes <= Self.maxBuffered
        default: return false
        }
    }

    private(set) var state: State = .idle
    private var buffered: ByteBuffer?
    private var timedOut = false

    var bufferedBytes: Int { buffered?.readableBytes ?? 0 }

    /// The original destination is known and allowed. `deferConnect`: an idle pooled
    /// upstream connection may serve the flow, so nothing is connected yet: the machine
    /// goes on as if connected, and `setUp` takes a pooled connection or connects then
    /// (the upstream cannot speak first, so a silent guest is opaque at the timeout).
    mutating func destinationKnown(deferConnect: Bool = false) -> [Action] {
        guard state == .idle else { return [] }
        if deferConnect {
            state = .connected
            return decideConnected()
        }
        state = .connecting(kind: nil)
        // Bytes may have arrived before the destination was read.
        switch classify() {
        case .flow(let kind)?:
            state = .connecting(kind: kind)
            return [.connect, .stopReading]
        case .connect?:
            state = .tunneling
            return [.stopReading, .tunnel]
        case nil:
            return [.connect]
        }
    }

    /// The guest sent bytes.
    mutating func guestRead(_ buffer: ByteBuffer) -> [Action] {
        var incoming = buffer
        if buffered == nil {
            buffered = incoming
        } else {
            buffered!.writeBuffer(&incoming)
        }
        switch state {
        case .idle:
            return bufferedBytes > Self.maxBuffered ? [.stopReading] : []
        case .connecting(kind: nil), .connected, .upstreamLost:
            switch classify() {
            case nil:
                return bufferedBytes > Self.maxBuffered ? [.stopReading] : []
            case .connect?:
                state = .tunneling
                return [.stopReading, .tunnel]
            case .flow(let kind)?:
                switch state {
                case .connected:
                    state = .settingUp(kind)
                    return [.stopReading, .setUp(kind)]
                case .upstreamLost:
                    state = .failed
                    return [.reset(reason: "upstream unavailable")]
                default:
                    state = .connecting(kind: kind)
                    return [.stopReading]
                }
            }
        case .connecting, .settingUp, .tunneling, .done:
            // Kept for the replay (reads already in flight when reading stopped), within
            // bounds: a guest that goes on sending while it is not read is cut off.
            guard bufferedBytes <= Self.maxHeld else {
                state = .failed
                return [.reset(reason: "the guest sent past the first-flight bound while it was not read")]
            }
            return []
        case .failed:
            return []
        }
    }

    /// The upstream TCP connection is up.
    mutating func upstreamConnected() -> [Action] {
        switch state {
        case .connecting(let kind?):
            state = .settingUp(kind)
            return [.setUp(kind)]
        case .connecting(nil):
            state = .connected
            return []
        default:
            return []
        }
    }

    /// The upstream sent bytes before the guest said anything decisive: a server that
    /// speaks first. The flow is opaque; the upstream's bytes are relayed at once.
    mutating func upstreamSpoke() -> [Action] {
        switch state {
        case .connected, .connecting(nil):
            state = .settingUp(.opaque)
            return [.stopReading, .setUp(.opaque)]
        default:
            return []
        }
    }

    /// The first-flight timeout: whatever has arrived decides (nothing: opaque).
    mutating func timeout() -> [Action] {
        timedOut = true
        switch state {
        case .connected:
            return decideConnected()
        case .connecting(nil):
            switch classify() {
            case .flow(let kind)?:
                state = .connecting(kind: kind)
            case .connect?:
                state = .tunneling
                return [.stopReading, .tunnel]
            case nil:
                break
            }
            return [.stopReading]
        case .upstreamLost:
            state = .failed
            return [.reset(reason: "upstream unavailable")]
        case .idle:
            state = .failed
            return [.reset(reason: "no original destination in time")]
        default:
            return []
        }
    }

    mutating func upstreamFailed() -> [Action] {
        switch state {
        case .done, .failed, .tunneling, .upstreamLost:
            return []
        case .connecting(kind: nil) where bufferedBytes == 0 || classify() == nil:
            // The guest has not said what it is: a CONNECT needs no upstream. Anything else
            // is reset when it shows, or at the first-flight timeout.
            state = .upstreamLost
            return []
        default:
            state = .failed
            return [.reset(reason: "upstream unavailable")]
        }
    }

    /// Connected (or connecting deferred): what has arrived decides, if it can.
    private mutating func decideConnected() -> [Action] {
        switch classify() {
        case .flow(let kind)?:
            state = .settingUp(kind)
            return [.stopReading, .setUp(kind)]
        case .connect?:
            state = .tunneling
            return [.stopReading, .tunnel]
        case nil:
            return []
        }
    }

    /// The pipelines are ready: the bytes to replay, in order.
    mutating func setUpDone() -> ByteBuffer? {
        guard case .settingUp = state else { return nil }
        state = .done
        defer { buffered = nil }
        return buffered
    }

    /// The `CONNECT` request and whatever followed it, for the tunnel to take over.
    mutating func takeTunnelRequest() -> ByteBuffer? {
        guard state == .tunneling else { return nil }
        state = .done
        defer { buffered = nil }
        return buffered
    }

    /// After `takeTunnelRequest`: what the guest sent meanwhile (reads in flight), in order.
    mutating func takeLeftover() -> ByteBuffer? {
        guard state == .done else { return nil }
        defer { buffered = nil }
        return buffered
    }

    static let connectPrefix = Array("CONNECT ".utf8)

    /// What the first bytes say, or nil while undecided.
    private func classify() -> Classification? {
        guard let buffered, buffered.readableBytes > 0 else { return timedOut ? .flow(.opaque) : nil }
        let bytes = Array(buffered.readableBytesView.prefix(Self.maxBuffered))
        switch ClientHello.parse(bytes) {
        case .clientHello(let name):
            return .flow(.tls(serverName: name, http2: ClientHello.applicationProtocols(bytes).contains("h2")))
        case .incomplete:
            return timedOut || buffered.readableBytes >= Self.maxBuffered ? .flow(.opaque) : nil
        case .notClientHello:
            break
        }
        // CONNECT: once its head is whole, or past the bound (which the tunnel refuses).
        if bytes.starts(with: Self.connectPrefix) || Self.connectPrefix.starts(with: bytes) {
            if Self.headEnd(in: bytes) != nil || (bytes.count >= Self.maxBuffered && bytes.starts(with: Self.connectPrefix)) { return .connect }
            if bytes.count >= Self.maxBuffered || timedOut { return .flow(bytes.count >= Self.connectPrefix.count ? .http : .opaque) }
            return nil
        }
        // HTTP/1.x: a method token of capital letters, then a space.
        var letters = 0
        for byte in bytes.prefix(16) {
            if byte >= 0x41 && byte <= 0x5A {
                letters += 1
                continue
            }
            return .flow(byte == 0x20 && letters >= 3 ? .http : .opaque)
        }
        return bytes.count >= 16 || timedOut ? .flow(.opaque) : nil
    }

    /// The offset just past the first CRLF CRLF.
    static func headEnd(in bytes: [UInt8]) -> Int? {
        guard bytes.count >= 4 else { return nil }
        for index in 0...(bytes.count - 4) where bytes[index] == 0x0D && bytes[index + 1] == 0x0A && bytes[index + 2] == 0x0D && bytes[index + 3] == 0x0A {
            return index + 4
        }
        return nil
    }
}

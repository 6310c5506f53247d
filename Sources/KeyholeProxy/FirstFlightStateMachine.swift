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
struct FirstFlightStateMachine {
    enum Kind: Equatable, Sendable {
        case tls(serverName: String?)
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
        /// Handed over to the relay.
        case done
        case failed
    }

    /// The most guest bytes a classification needs: the largest ClientHello record (16 KiB
    /// + header) with room to spare. Past this the guest is not read until set-up is done.
    static let maxBuffered = 16 * 1024 + 2048 + 5

    private(set) var state: State = .idle
    private var buffered: ByteBuffer?
    private var timedOut = false

    var bufferedBytes: Int { buffered?.readableBytes ?? 0 }

    /// The original destination is known and allowed.
    mutating func destinationKnown() -> [Action] {
        guard state == .idle else { return [] }
        state = .connecting(kind: nil)
        // Bytes may have arrived before the destination was read.
        if let kind = classify() {
            state = .connecting(kind: kind)
            return [.connect, .stopReading]
        }
        return [.connect]
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
        case .connecting(kind: nil):
            guard let kind = classify() else { return bufferedBytes > Self.maxBuffered ? [.stopReading] : [] }
            state = .connecting(kind: kind)
            return [.stopReading]
        case .connected:
            guard let kind = classify() else { return bufferedBytes > Self.maxBuffered ? [.stopReading] : [] }
            state = .settingUp(kind)
            return [.stopReading, .setUp(kind)]
        case .connecting, .settingUp, .done, .failed:
            // Kept for the replay (reads already in flight when reading stopped).
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
            guard let kind = classify() else { return [] }
            state = .settingUp(kind)
            return [.stopReading, .setUp(kind)]
        case .connecting(nil):
            if let kind = classify() { state = .connecting(kind: kind) }
            return [.stopReading]
        case .idle:
            state = .failed
            return [.reset(reason: "no original destination in time")]
        default:
            return []
        }
    }

    mutating func upstreamFailed() -> [Action] {
        guard state != .done, state != .failed else { return [] }
        state = .failed
        return [.reset(reason: "upstream unavailable")]
    }

    /// The pipelines are ready: the bytes to replay, in order.
    mutating func setUpDone() -> ByteBuffer? {
        guard case .settingUp = state else { return nil }
        state = .done
        defer { buffered = nil }
        return buffered
    }

    /// What the first bytes say, or nil while undecided.
    private func classify() -> Kind? {
        guard let buffered, buffered.readableBytes > 0 else { return timedOut ? .opaque : nil }
        let bytes = Array(buffered.readableBytesView.prefix(Self.maxBuffered))
        switch ClientHello.parse(bytes) {
        case .clientHello(let name):
            return .tls(serverName: name)
        case .incomplete:
            return timedOut || buffered.readableBytes >= Self.maxBuffered ? .opaque : nil
        case .notClientHello:
            break
        }
        // HTTP/1.x: a method token of capital letters, then a space.
        var letters = 0
        for byte in bytes.prefix(16) {
            if byte >= 0x41 && byte <= 0x5A {
                letters += 1
                continue
            }
            return byte == 0x20 && letters >= 3 ? .http : .opaque
        }
        return bytes.count >= 16 || timedOut ? .opaque : nil
    }
}

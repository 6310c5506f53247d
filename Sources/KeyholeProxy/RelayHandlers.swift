import NIOCore
import NIOSSL
import NIOTLS

/// Guest side, after TLS (if any): bytes into the engine.
final class GuestSideHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let session: Session

    init(session: Session) {
        self.session = session
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        session.fromGuest(unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        session.guestClosed()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // A slow guest: stop reading from the upstream until the guest drains.
        session.upstream?.setOption(.autoRead, value: context.channel.isWritable).whenFailure { _ in }
        context.fireChannelWritabilityChanged()
    }

    /// Whether the guest's TLS handshake (with Keyhole's forged certificate) completed; on
    /// plain connections there is none.
    private var handshakeDone = false

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            session.abort()
            return
        }
        if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls { handshakeDone = true }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let text = "\(error)"
        let duringHandshake = session.serverName != nil && !handshakeDone && session.rewriter?.identity.isTLS == true
        // The guest's TLS client refused the forged certificate. An explicit alert names it
        // (unknown CA, bad certificate); more often the TLS 1.3 client's alert arrives as a
        // record BoringSSL cannot read (BAD_PACKET_LENGTH), or the client just hangs up
        // mid-handshake. Say what it most likely is, and how to fix it.
        let alert = ["UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "UNSUPPORTED_CERTIFICATE"].contains(where: text.contains)
        var aborted = text.contains("BAD_PACKET_LENGTH")
        if let ssl = error as? NIOSSLError, case .uncleanShutdown = ssl { aborted = true }
        if alert || (duringHandshake && aborted) {
            session.record(
                .warn, "guest-does-not-trust-ca", reason: alert ? "tls-alert" : "handshake-aborted",
                detail: (alert ? "the guest's TLS client rejected Keyhole's certificate" : "the guest's TLS client gave up during the handshake, after Keyhole's certificate (most often: it does not trust the sandbox CA)")
                    + " (\(text)): install the sandbox CA in the guest; `keyhole ca install-script` prints a script that does it for the system store and for runtimes with their own bundles (Python requests/httpx, Node, gRPC, Java)")
            session.abort()
            return
        }
        // A peer that closes without close_notify is common and harmless: just close.
        if let ssl = error as? NIOSSLError, case .uncleanShutdown = ssl {
            session.guestClosed()
            return
        }
        session.record(.warn, "guest-error", detail: text)
        session.abort()
    }
}

@available(*, unavailable)
extension GuestSideHandler: Sendable {}

/// Upstream side: bytes back to the guest, unchanged.
final class UpstreamSideHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let session: Session

    init(session: Session) {
        self.session = session
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        session.fromUpstream(unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        session.upstreamClosed()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // A slow upstream: stop reading from the guest until the upstream drains.
        session.updateGuestReading()
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let ssl = error as? NIOSSLError, case .uncleanShutdown = ssl {
            session.upstreamClosed()
            return
        }
        session.record(.warn, "upstream-error", detail: "\(error)")
        session.abort()
    }
}

@available(*, unavailable)
extension UpstreamSideHandler: Sendable {}

/// Holds what the upstream sends before the session's pipelines are built (a banner), and
/// says when the first of it arrives; `release()` passes it on and removes the handler.
/// Reading stops after the first bytes, so a chatty server cannot fill memory meanwhile.
final class UpstreamHoldHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private var held: [NIOAny] = []
    private var inactive = false
    private var context: ChannelHandlerContext?
    private let onFirstBytes: () -> Void

    init(onFirstBytes: @escaping () -> Void) {
        self.onFirstBytes = onFirstBytes
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let first = held.isEmpty
        held.append(data)
        if first {
            context.channel.setOption(.autoRead, value: false).whenFailure { _ in }
            onFirstBytes()
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        inactive = true
    }

    /// Passes on what was held (and a close that happened meanwhile), then gets out of the way.
    func release() {
        guard let context else { return }
        let held = self.held
        self.held = []
        for data in held { context.fireChannelRead(data) }
        if inactive { context.fireChannelInactive() }
        let channel = context.channel
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        channel.setOption(.autoRead, value: true).whenFailure { _ in }
    }
}

@available(*, unavailable)
extension UpstreamHoldHandler: Sendable {}

/// Completes when the upstream TLS handshake (with full verification) completes.
final class HandshakeWatcher: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    let promise: EventLoopPromise<Void>
    var done = false

    init(promise: EventLoopPromise<Void>) {
        self.promise = promise
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event, !done {
            done = true
            promise.succeed()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !done {
            done = true
            promise.fail(error)
        }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !done {
            done = true
            promise.fail(ChannelError.eof)
        }
        context.fireChannelInactive()
    }
}

@available(*, unavailable)
extension HandshakeWatcher: Sendable {}

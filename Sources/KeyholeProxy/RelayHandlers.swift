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
        if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls { handshakeDone = true }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        session.guestFailed(error, handshakeDone: handshakeDone)
    }
}

@available(*, unavailable)
extension GuestSideHandler: Sendable {}

/// Upstream side: bytes back to the guest, unchanged.
final class UpstreamSideHandler: ChannelInboundHandler, RemovableChannelHandler {
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
    /// Succeeds with the protocol ALPN chose (nil for none).
    let promise: EventLoopPromise<String?>
    var done = false

    init(promise: EventLoopPromise<String?>) {
        self.promise = promise
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted(let chosen) = event, !done {
            done = true
            promise.succeed(chosen)
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

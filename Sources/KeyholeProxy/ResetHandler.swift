import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Put first in a guest pipeline when the connection is reset: closing through it bypasses
/// TLS, so a reset is a reset (SO_LINGER 0: RST, not FIN) and no close_notify is sent. Added
/// only then, not at accept: a handler at the head would be one more hop for every read.
final class ResetHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
}

@available(*, unavailable)
extension ResetHandler: Sendable {}

extension Channel {
    /// RST the connection: nothing more is sent, the peer sees "connection reset".
    func reset() {
        eventLoop.assertInEventLoop()
        let channel = self
        let linger = (channel as? any SocketOptionProvider)?.setSoLinger(linger(l_onoff: 1, l_linger: 0))
            ?? eventLoop.makeSucceededVoidFuture()
        linger.assumeIsolated().whenComplete { _ in
            let pipeline = channel.pipeline.syncOperations
            if (try? pipeline.context(handlerType: ResetHandler.self)) == nil {
                try? pipeline.addHandler(ResetHandler(), position: .first)
            }
            if let context = try? pipeline.context(handlerType: ResetHandler.self) {
                context.close(promise: nil)
            } else {
                channel.close(promise: nil)
            }
        }
    }
}

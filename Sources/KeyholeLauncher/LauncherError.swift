/// The error type of `KeyholeLauncher`: each case says what failed and why, never a secret.
public enum LauncherError: Error, Sendable, CustomStringConvertible {
    case image(String)
    case network(String)
    case accelerator(String)
    case qemu(String)
    case busy(String)

    public var description: String {
        switch self {
        case .image(let reason): return "builtin image: \(reason)"
        case .network(let reason): return "guest network: \(reason)"
        case .accelerator(let reason): return reason
        case .qemu(let reason): return "qemu: \(reason)"
        case .busy(let reason): return reason
        }
    }
}

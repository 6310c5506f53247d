/// The error type of the Keyhole SDK. No message holds a secret's real value.
public enum SandboxError: Error, Sendable, CustomStringConvertible, Equatable {
    /// The configuration breaks the policy rules; each message is one problem, worded as
    /// `keyhole policy check` words it for a file.
    case invalidConfiguration([String])
    /// Sandboxes and appliances need root (TAP devices, netfilter).
    case needsRoot
    /// The sandbox or appliance could not start; the reason, then the launcher's last lines.
    case startFailed(String)
    /// `run` needs the builtin image's command agent.
    case noAgent
    /// The command would carry a secret's real value into the guest (named by its env).
    case valueInCommand(String)
    /// The sandbox is stopped (or stopped while the command ran).
    case stopped
    /// block-and-terminate shut the sandbox down; the reason names the secret and host.
    case terminated(String)
    /// The guest's agent broke the protocol; the connection to it was closed.
    case agentProtocol(String)

    public var description: String {
        switch self {
        case .invalidConfiguration(let problems): return "invalid sandbox configuration:\n" + problems.map { "  " + $0 }.joined(separator: "\n")
        case .needsRoot: return "a Keyhole sandbox needs root (it creates a TAP device and netfilter rules)"
        case .startFailed(let reason): return "the sandbox could not start: \(reason)"
        case .noAgent: return "run needs the builtin image (.image(.builtin)), whose guest carries Keyhole's command agent"
        case .valueInCommand(let env): return "the command holds the real value of secret '\(env)'; pass the placeholder ($\(env) in the guest) instead"
        case .stopped: return "the sandbox is stopped"
        case .terminated(let reason): return "block-and-terminate shut the sandbox down: \(reason)"
        case .agentProtocol(let reason): return "the guest's command agent broke the protocol (\(reason)); its connection was closed"
        }
    }
}

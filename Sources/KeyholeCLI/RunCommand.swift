import ArgumentParser
import Foundation
import KeyholeLauncher
import KeyholePolicy
import KeyholeProxy

struct RunCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Boot a guest behind Keyhole, from a policy file or flags.",
        discussion: """
            Creates a TAP for the sandbox, runs the appliance on it (every guest TCP flow through \
            the proxy, DNS observed, egress rules), and boots the guest with QEMU (KVM when it \
            works, TCG otherwise). The guest gets each secret's placeholder in its environment and \
            trusts the sandbox CA; it never sees a real value or the CA key.

            With a COMMAND (or guest.command), the command runs in the guest, its output streams \
            here, and keyhole run exits with its status. Without one, the guest's serial console \
            is attached (Ctrl-A X leaves QEMU).

            The policy file is optional: `keyhole run --secret GITHUB_TOKEN@api.github.com -- sh -c '…'` \
            boots the builtin guest with one secret, its value read from the host's $GITHUB_TOKEN. \
            Flags merge with a file; a flag that contradicts the file is an error naming both places.

            Exit status: the command's status; 4 block-and-terminate shut the guest down; 130/143 \
            stopped by SIGINT/SIGTERM; 1 the sandbox could not start; 2 usage or policy error.
            """
    )

    @Argument(help: "Policy file (optional: flags alone describe a sandbox).") var file: String?
    @Argument(parsing: .postTerminator, help: "Command to run in the guest (after --).") var command: [String] = []

    @OptionGroup var state: StateOptions

    @OptionGroup var secretFlags: SecretFlags

    @Option(help: ArgumentHelp("The sandbox's name (its TAP, rules and state); default: the policy's, else \(CommandLinePolicy.defaultName).", valueName: "name"))
    var name: String?

    @Option(help: ArgumentHelp("The guest image: builtin.", valueName: "image"))
    var image: String?

    @Option(help: ArgumentHelp("Guest memory in MiB (default 512).", valueName: "mib"))
    var memory: Int?

    @Option(help: ArgumentHelp("Guest vCPUs (default 1).", valueName: "n"))
    var vcpus: Int?

    @Option(help: ArgumentHelp("Append audit events (JSON lines) to this file (default: stderr).", valueName: "file"))
    var auditLog: String?

    func run() async throws {
        var flags = secretFlags.commandLine
        flags.name = name
        flags.image = image
        flags.memoryMiB = memory
        flags.vcpus = vcpus
        let policy = try PolicyFile.load(file, flags: flags)
        for warning in policy.warnings { Output.err(warning.description) }
        let audit: AuditLog
        do {
            audit = try auditLog.map { path throws(ProxyError) in try AuditLog(path: path) } ?? AuditLog()
        } catch {
            Output.err("keyhole run: \(error)")
            throw ExitCode(1)
        }
        let launcher = Launcher(
            policy: policy, stateDirectory: state.resolved, command: command.isEmpty ? nil : command, audit: audit,
            progress: { Output.err("keyhole run: " + $0) })
        let signals = SignalWatcher(signals: [SIGINT, SIGTERM]) { signal in launcher.stop(signal: signal) }
        defer { signals.cancel() }
        let outcome: Launcher.Outcome
        do {
            outcome = try await launcher.run()
        } catch {
            Output.err("keyhole run: \(error)")
            throw ExitCode(1)
        }
        switch outcome {
        case .exited(let status):
            if status != 0 { throw ExitCode(status) }
        case .terminated(let reason):
            Output.err("keyhole run: block-and-terminate: \(reason); the guest was shut down")
            throw ExitCode(4)
        case .interrupted(let signal):
            Output.err("keyhole run: stopped by \(signal == SIGINT ? "SIGINT" : "SIGTERM"); TAP and rules removed")
            throw ExitCode(128 + signal)
        }
    }
}

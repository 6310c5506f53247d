import ArgumentParser

@main
struct Keyhole: AsyncParsableCommand {
    static let version = "0.1.0"

    static let configuration = CommandConfiguration(
        commandName: "keyhole",
        abstract: "Transparent egress credential proxy: guests hold placeholders, Keyhole swaps in real values only for verified, allowed hosts.",
        version: version,
        subcommands: [
            PolicyCommand.self, CACommand.self, RewriteCommand.self, ProxyCommand.self, RunCommand.self, ImageCommand.self,
        ]
    )

    /// Like the default entry point, but usage errors exit 2 (the documented contract)
    /// instead of ArgumentParser's 64.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            let code = exitCode(for: error)
            if code == .validationFailure {
                Output.err(fullMessage(for: error))
                Output.err("Run 'keyhole --help' for usage.")
                exit(withError: ExitCode(2))
            }
            exit(withError: error)
        }
    }
}

/// Options shared by commands that use the state directory.
struct StateOptions: ParsableArguments {
    @Option(
        name: .customLong("state-dir"),
        help: ArgumentHelp("Directory holding the sandbox CA and state (env: KEYHOLE_STATE_DIR).", valueName: "dir"))
    var stateDirectory: String?

    var resolved: String {
        if let stateDirectory { return stateDirectory }
        if let fromEnv = ProcessEnvironmentValue.get("KEYHOLE_STATE_DIR"), !fromEnv.isEmpty { return fromEnv }
        return "/var/lib/keyhole"
    }
}

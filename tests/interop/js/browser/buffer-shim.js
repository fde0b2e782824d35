// Injected by esbuild (see package.json): rsocket-js uses Node's global
// Buffer, which browsers lack.
export {Buffer} from 'buffer';

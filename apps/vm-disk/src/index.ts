// The public surface of the vm-disk app: `main` runs the command line as the `vm-disk` bin does.
export { main, usage, VERSION } from './main.ts';
